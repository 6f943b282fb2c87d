"""Process group, model-parallel group, device and dtype: the same code under torchrun or in a plain process."""

import atexit
import contextlib
import io
import os
from datetime import timedelta
from typing import Optional, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(device: Union[str, torch.device, None]) -> torch.device:
    """The requested device, or this process's CUDA device (by LOCAL_RANK) if there is one, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available: use device='cpu'")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"cuda:{index} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"device {device} is not supported: use 'cpu' or 'cuda'")
    return device


def pick_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """The requested dtype, else bfloat16 on a GPU that supports it (float16 on others) and float32 on the CPU."""
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16")
    return dtype


def init_model_parallel(device: torch.device, model_parallel_size: Optional[int] = None) -> Tuple[int, int]:
    """Start (once) the process group and fairscale's model-parallel group; return (rank, world size).

    Under torchrun the group spans all launched processes, across nodes too; a plain process is a group
    of one that needs no environment variables or network.
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(minutes=int(os.environ.get("LLAMA_DIST_TIMEOUT_MIN", 30)))
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        atexit.register(_shutdown)
    world_size = dist.get_world_size()
    if model_parallel_size is not None and model_parallel_size != world_size:
        raise ValueError(
            f"model_parallel_size {model_parallel_size} differs from the {world_size} launched process(es): "
            f"leave it unset, or launch that many with torchrun --nproc_per_node"
        )
    if not fs_init.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale announces its groups on every rank
            fs_init.initialize_model_parallel(world_size)
    return dist.get_rank(), world_size


def _shutdown() -> None:
    """Close the process group before the interpreter exits; gloo aborts the process if left open."""
    if dist.is_initialized():
        dist.destroy_process_group()
