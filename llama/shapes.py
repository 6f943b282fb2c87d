"""Meta checkpoints of Llama's published shapes with seeded random weights, for `llama bench --shape`.

A model's speed does not depend on its weights' values, only on its shape and their precision, so a checkpoint of
the exact shape of Llama 3.2 1B or 3B or Llama 3.1 8B, in bfloat16 as Meta ships it, measures what the real one
would, without a download or a licence. Each is written once into the cache (`$LLAMA_CACHE/shapes/<name>`) and
reused; its file is laid out as Meta's, the Llama 3.2 output projection stored as the embedding matrix itself.
"""

import json
import mmap
import shutil
import sys
import zlib
from pathlib import Path
from typing import Dict, NamedTuple, Tuple, Union

import torch
from tqdm import tqdm

from .checkpoint import EMBEDDING_KEY, OUTPUT_KEY, parameter_layout, staged_directory
from .demo import built_once, cache_root
from .model import ModelArgs
from .pages import release_pages
from .tokenizer import default_tokenizer_path


class Shape(NamedTuple):
    params: dict  # Meta's params.json
    tied: bool  # the output projection is the embedding matrix (Llama 3.2 1B and 3B)


_LLAMA3 = {"vocab_size": 128256, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}
# Meta's params.json of each shape (llama-models' sku_list holds the same; the tests compare them).
SHAPES: Dict[str, Shape] = {
    "llama3.2-1b": Shape(
        {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.5, "multiple_of": 256,
         **_LLAMA3},
        tied=True,
    ),
    "llama3.2-3b": Shape(
        {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "ffn_dim_multiplier": 1.0, "multiple_of": 256,
         **_LLAMA3},
        tied=True,
    ),
    "llama3.1-8b": Shape(
        {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 1024,
         **_LLAMA3},
        tied=False,
    ),
}  # fmt: skip
SHAPES_DIR = "shapes"
SHARD_NAME = "consolidated.00.pth"
WEIGHT_DTYPE = torch.bfloat16
MATRIX_STD = 0.02  # about the spread of trained Llama matrices; norms are ones
FILE_SLACK_BYTES = 32 << 20  # a written file's allowance beyond its weights: metadata, tokenizer


def shape_named(name: str) -> Shape:
    """The shape called `name`; a one-line error listing the shapes otherwise."""
    if name not in SHAPES:
        raise ValueError(f"unknown --shape {name!r}: use one of {', '.join(SHAPES)}")
    return SHAPES[name]


def stored_bytes(args: ModelArgs, *, tied: bool, matrix: float, vector: float) -> int:
    """The size of a file holding the weights `args` describes at `matrix` bytes per matrix value and `vector`
    per norm value, the output projection left out when `tied`, plus FILE_SLACK_BYTES."""
    total = FILE_SLACK_BYTES
    for key, (shape, _) in parameter_layout(args).items():
        if not (tied and key == OUTPUT_KEY):
            total += torch.Size(shape).numel() * (matrix if len(shape) == 2 else vector)
    return int(total)


def check_free_space(directory: Path, needed: int, what: str, advice: str) -> None:
    """A one-line error if the file system of `directory` (or of its nearest existing parent) has less than
    `needed` bytes free for `what`, checked before minutes of writing; `advice` says where else to write."""
    existing = Path(directory).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ValueError(
            f"{what} need {needed / 1e9:.1f} GB of disk in {directory}, which has {free / 1e9:.1f} GB free: "
            f"free some space, or {advice}"
        )


def shape_dir(name: str, cache_dir: Union[str, Path, None] = None) -> Path:
    """Where the checkpoint of shape `name` is cached (see llama.demo.cache_root)."""
    shape_named(name)
    return cache_root(cache_dir) / SHAPES_DIR / name


def shape_checkpoint(name: str, *, cache_dir: Union[str, Path, None] = None) -> Path:
    """The checkpoint directory of shape `name` with random weights (seed 0), written on first use into the cache
    and reused after."""
    shape = shape_named(name)

    def write(path: Path) -> None:
        print(f"Writing a {name}-shaped checkpoint with random weights into {path} (once)", file=sys.stderr)
        write_random_checkpoint(path, shape.params, tied=shape.tied)

    return built_once(shape_dir(name, cache_dir), write)


def write_random_checkpoint(out_dir: Union[str, Path], params: dict, *, tied: bool, seed: int = 0) -> Path:
    """Write a one-shard Meta checkpoint directory of the shape `params` describes, in bfloat16, with weights
    drawn from `seed` (the same for the same seed, whatever the machine's thread count), the Llama 3 tokenizer
    and checklist.chk. `tied`: output.weight is stored as the embedding matrix itself, once, as in Meta's
    Llama 3.2 files. Each tensor is drawn straight into the file, so memory holds no copy of the model."""
    args = ModelArgs(**params)
    with staged_directory(Path(out_dir)) as staging:
        (staging / "params.json").write_text(json.dumps(params))
        shutil.copyfile(default_tokenizer_path(), staging / "tokenizer.model")
        _reserve_shard(staging / SHARD_NAME, args, tied=tied)
        _fill_shard(staging / SHARD_NAME, seed)
    return Path(out_dir)


def _reserve_shard(path: Path, args: ModelArgs, *, tied: bool) -> None:
    """Write `path` as torch.save writes a state dict of `args`'s bfloat16 weights, with room for their values but
    none written (torch's skip_data). The tensors are never touched, so their memory is never committed."""
    state = {key: torch.empty(shape, dtype=WEIGHT_DTYPE) for key, (shape, _) in parameter_layout(args).items()}
    if tied:
        state[OUTPUT_KEY] = state[EMBEDDING_KEY]  # one storage, saved once
    with torch.serialization.skip_data():
        torch.save(state, path)


def _fill_shard(path: Path, seed: int) -> None:
    """Draw every tensor of the reserved shard `path` in place, through a shared memory map of the file (so memory
    holds about one tensor at a time): matrices normal with MATRIX_STD, norms ones. Each tensor has its own
    generator, seeded by `seed` and its name."""
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        state = torch.load(path, mmap=True, weights_only=True)
    tensors: Dict[int, Tuple[str, torch.Tensor]] = {}
    for key, tensor in state.items():  # a tied output projection is the embedding's storage: drawn once
        tensors.setdefault(tensor.untyped_storage().data_ptr(), (key, tensor))
    total = sum(tensor.nbytes for _, tensor in tensors.values())
    with tqdm(total=total, desc="writing random weights", unit="B", unit_scale=True) as progress:
        for key, tensor in tensors.values():
            if tensor.dim() == 1:
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, MATRIX_STD, generator=torch.Generator().manual_seed(_tensor_seed(seed, key)))
            release_pages(tensor)  # written to the file's pages: the process need not keep them
            progress.update(tensor.nbytes)


def _tensor_seed(seed: int, key: str) -> int:
    """A generator seed for tensor `key`, so that each tensor's values depend on `seed` and its name alone (32
    bits: torch's CPU generator keeps no more)."""
    return zlib.crc32(f"{seed}:{key}".encode())
