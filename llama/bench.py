"""`python -m llama.bench`: load time, time to first token, prefill and decode speed, the weights' bytes read per
second while decoding, and peak memory of this repo's model next to its peers (transformers' LlamaForCausalLM,
Meta's reference code, llama.cpp) on the same weights and dtype.

The checkpoint is the demo model, one of the user's (--ckpt_dir), or one of the exact shape of a published Llama
(--shape) with seeded random weights: speed does not depend on the weights' values, so it measures what Meta's
weights would. A shape's checkpoint and its exports for the peers are written once into the cache and reused.

Every measurement runs in a fresh worker process per system and repetition (so load time, process start to
first token and peak RSS are those of a cold process), systems alternating A B A B. Each worker warms up
before timing. Systems whose build takes a batch size (ours, llama-models) are built for one sequence, as the
chat is, and for the batch-N figure built for N in a second worker. Every system does the same work: each
measurement's prompts are random token ids from a seed of its own (the same for every system, and never a
prompt a system has cached), and generation is greedy and always runs the full number of tokens (stop tokens
are ignored; a worker fails if a system stops early).
"""

import contextlib
import functools
import importlib
import importlib.util
import json
import math
import mmap
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import gguf
import torch

from .checkpoint import (
    EMBEDDING_KEY, OUTPUT_KEY, ShardedCheckpoint, parameter_layout, read_params, read_quantization, shard_paths,
    write_atomically,
)
from .demo import built_once, demo_checkpoint_dir, is_built
from .generation import Llama
from .gguf_export import FILE_TYPES, export_gguf, gguf_name
from .gguf_import import ROPE_FREQS_TENSOR
from .hf import export_hf
from .model import ModelArgs
from .parallel import init_model_parallel, pick_dtype
from .quantized_linear import INT4_GROUP_SIZES, QUANTIZATIONS
from .shapes import WEIGHT_DTYPE, check_free_space, shape_checkpoint, shape_dir, shape_named, stored_bytes
from .soak import memory_mib

# Metric -> (label, unit, higher is better).
METRICS = {
    "load_s": ("load", "s", False),
    "start_to_first_token_s": ("process start to first token", "s", False),
    "ttft_s": ("time to first token (warm)", "s", False),
    "warmup_s": ("warm-up: 3 generations, compiling included", "s", False),
    "prefill_tok_s": ("prefill", "tok/s", True),
    "decode_b1_tok_s": ("decode, batch 1", "tok/s", True),
    "decode_batch_tok_s": ("decode, batch N", "tok/s", True),
    "decode_b1_weights_gb_s": ("weights read per second, decode batch 1", "GB/s", True),
    "peak_rss_mb": ("peak RSS", "MB", False),
    "rss_growth_mb": ("peak RSS above the worker's start", "MB", False),
}
RESULT_MARK = "BENCH_RESULT "
# Systems and their options (`ours+int8`): this repo (weight-quantized, with a compiled decode step, or both),
# transformers, Meta's llama-models reference, llama.cpp through llama-cpp-python (Q8_0 or Q4_0 weights).
SYSTEM_OPTIONS = {
    "ours": ("int8", "int4", "compile", "int8+compile", "int4+compile"),
    "transformers": (),
    "llama-models": (),
    "llama.cpp": ("q8_0", "q4_0"),
}
DEFAULT_SYSTEMS = ("ours", "transformers")
# With --shape: every peer in the checkpoint's precision and at both quantized sizes.
SHAPE_SYSTEMS = ("ours", "ours+int8", "ours+int4", "transformers", "llama.cpp", "llama.cpp+q8_0", "llama.cpp+q4_0")
# The package each peer system imports, and how to install it.
SYSTEM_PACKAGES = {
    "transformers": ("transformers", 'pip install -e ".[bench]"'),
    "llama-models": ("llama_models", 'pip install -e ".[bench]"'),
    "llama.cpp": ("llama_cpp", "pip install llama-cpp-python (it compiles llama.cpp)"),
}
# The GGUF file type llama.cpp runs for each dtype.
GGUF_FILE_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def machine() -> dict:
    """CPU model, core count, instruction-set hints and library versions."""
    cpu, flags = platform.processor() or "unknown", ""
    if Path("/proc/cpuinfo").is_file():
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags.split(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
    }


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version(module: str) -> Optional[str]:
    return importlib.import_module(module).__version__ if _installed(module) else None


def check_installed(systems: Sequence[str], packages: Dict[str, Tuple[str, str]] = SYSTEM_PACKAGES) -> None:
    """A one-line error naming the missing package of the first of `systems` that needs one, and how to install
    it (checked before minutes of measuring); `packages` maps a system to its module and install command."""
    for system in systems:
        module, install = packages.get(system, (None, None))
        if module is not None and not _installed(module):
            raise ValueError(f"the {system} system needs the {module} package: {install}, or leave it out of --systems")


def parse_system(name: str) -> Tuple[str, Optional[str]]:
    """`ours+int8+compile` -> ("ours", "int8+compile"); `transformers` -> ("transformers", None)."""
    base, _, option = name.partition("+")
    if base not in SYSTEM_OPTIONS or (option and option not in SYSTEM_OPTIONS[base]):
        names = [f"{base}+{option}" for base, options in SYSTEM_OPTIONS.items() for option in ("", *options)]
        raise ValueError(f"unknown system {name!r}: use {', '.join(n.removesuffix('+') for n in names)}")
    return base, option or None


def _options(system: str) -> List[str]:
    """`ours+int8+compile` -> ["int8", "compile"]."""
    return (parse_system(system)[1] or "").split("+")


def _quantization(system: str) -> Optional[str]:
    """The weight quantization a system of ours applies at load (`ours+int4+compile` -> "int4"), if any."""
    return next((option for option in _options(system) if option in QUANTIZATIONS), None)


# Each system's `generate(prompts, new_tokens)` decodes greedily and returns how many tokens each prompt got.


class _Ours:
    """This repo's Llama, generating through the public `generate`."""

    sized = True  # built for `batch` sequences at most

    def __init__(self, spec: dict, batch: int):
        self.llama = Llama.build(
            spec["ckpt_dir"], max_seq_len=spec["max_seq_len"], max_batch_size=batch, dtype=spec["dtype"],
            device="cpu", quantize=_quantization(spec["system"]), compile="compile" in _options(spec["system"]),
        )
        self.llama.tokenizer.stop_tokens = set()  # always generate the full length

    def generate(self, prompts: List[List[int]], new_tokens: int) -> List[int]:
        tokens, _ = self.llama.generate(prompts, new_tokens, temperature=0)
        return [len(t) for t in tokens]


class _Transformers:
    """transformers' LlamaForCausalLM (sdpa attention) loaded from a Hugging Face export of the same weights."""

    def __init__(self, spec: dict, batch: int):
        from transformers import LlamaForCausalLM

        dtype = getattr(torch, spec["dtype"])
        self.model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=dtype, attn_implementation="sdpa").eval()

    def generate(self, prompts: List[List[int]], new_tokens: int) -> List[int]:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0,
            )  # min_new_tokens: no end-of-text token before the full length
        return [out.shape[1] - ids.shape[1]] * len(prompts)


class _LlamaModels:
    """The reference Transformer of Meta's llama-models package on the same Meta checkpoint, with a greedy loop
    like its generator's (prefill, then one token at a time; its forward returns every position's logits)."""

    sized = True  # built for `batch` sequences at most

    def __init__(self, spec: dict, batch: int):
        from llama_models.llama3.args import ModelArgs as ReferenceArgs
        from llama_models.llama3.model import Transformer

        init_model_parallel(torch.device("cpu"))
        dtype = getattr(torch, spec["dtype"])
        params = read_params(Path(spec["ckpt_dir"]))
        torch.set_default_dtype(dtype)  # as Meta's build does; the KV caches follow it
        args = ReferenceArgs(max_seq_len=spec["max_seq_len"], max_batch_size=batch, **params)
        self.model = Transformer(args)
        torch.set_default_dtype(torch.float32)
        ours = ModelArgs(max_seq_len=spec["max_seq_len"], max_batch_size=batch, **params)
        state = ShardedCheckpoint(Path(spec["ckpt_dir"]), ours).rank_state_dict(0, 1, dtype, torch.device("cpu"))
        self.model.load_state_dict(state, strict=True)

    def generate(self, prompts: List[List[int]], new_tokens: int) -> List[int]:
        tokens = torch.tensor(prompts)
        logits = self.model.forward(tokens, 0)
        for position in range(tokens.shape[1], tokens.shape[1] + new_tokens - 1):
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (bs, 1)
            logits = self.model.forward(next_token, position)
        return [new_tokens] * len(prompts)  # one forward per token, whatever they are


class _LlamaCpp:
    """llama.cpp through llama-cpp-python, on a GGUF written from the same checkpoint (`export_gguf`). Its Python
    API runs one sequence at a time, so it has no batch-N figure. Its `generate` never stops by itself."""

    batched = False

    def __init__(self, spec: dict, batch: int):
        from llama_cpp import Llama as LlamaCpp

        self.model = LlamaCpp(
            model_path=spec["gguf_paths"][spec["system"]], n_ctx=spec["max_seq_len"], n_batch=spec["max_seq_len"],
            n_threads=spec["threads"], verbose=False,
        )

    def generate(self, prompts: List[List[int]], new_tokens: int) -> List[int]:
        counts = []
        for prompt in prompts:
            self.model.reset()  # else it would reuse the cache of a previous prompt that starts alike
            tokens = self.model.generate(prompt, temp=0, top_k=1, reset=True)
            counts.append(sum(1 for _ in zip(range(new_tokens), tokens)))
        return counts


SYSTEM_CLASSES = {"ours": _Ours, "transformers": _Transformers, "llama-models": _LlamaModels, "llama.cpp": _LlamaCpp}


def _is_sized(system: str) -> bool:
    """Whether `system`'s build takes a batch size (measured by two workers, see run_system)."""
    return getattr(SYSTEM_CLASSES[parse_system(system)[0]], "sized", False)


def _prompts(name: str, batch: int, length: int, vocab_size: int) -> List[List[int]]:
    """The prompts of measurement `name`: random token ids from a seed of that name, so every system gets the same
    ones, and no measurement repeats another's (no system starts from a prompt it has cached)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randint(0, vocab_size, (batch, length), generator=gen).tolist()


def worker(spec: dict) -> dict:
    """Load one system in this (fresh) process and time it as `spec` says; with `batch_only`, only the batch-N
    figure, built for N (see run_system)."""
    torch.set_num_threads(spec["threads"])
    new, batch, long = spec["new_tokens"], spec["batch"], spec["prefill_len"]
    start_rss_mb = memory_mib("VmRSS")  # Python, torch and this repo imported
    system_class, sized = SYSTEM_CLASSES[parse_system(spec["system"])[0]], _is_sized(spec["system"])

    def generation_time(name: str, new_tokens: int, rows: int = 1, length: int = spec["prompt_len"]) -> float:
        """Seconds `system` takes to generate `new_tokens` for the prompts of measurement `name`, checked to be
        the full count."""
        prompts = _prompts(name, rows, length, spec["vocab_size"])
        start = time.perf_counter()
        counts = system.generate(prompts, new_tokens)
        elapsed = time.perf_counter() - start
        if counts != [new_tokens] * rows:
            raise RuntimeError(f"{spec['system']} generated {counts} tokens instead of {new_tokens} per prompt")
        return elapsed

    if spec["batch_only"]:
        system, result = system_class(spec, batch), {}
        generation_time("untimed prefill", 1, length=long)  # as in the other worker: large buffers freed before
    else:
        start = time.perf_counter()
        system = system_class(spec, 1 if sized else batch)
        result = {"load_s": time.perf_counter() - start}
        generation_time("first token", 1)
        result["start_to_first_token_s"] = time.time() - spec["launch_time"]
        result["warmup_s"] = generation_time("warm-up prefill", 1, length=long) + generation_time("warm-up", 4)
        result["ttft_s"] = generation_time("time to first token", 1)
        result["prefill_tok_s"] = long / generation_time("prefill", 1, length=long)
        result["decode_b1_tok_s"] = (new - 1) / (generation_time("decode", new) - result["ttft_s"])
        result["decode_batch_tok_s"] = None
    if spec["batch_only"] or (not sized and getattr(system_class, "batched", True)):
        result["warmup_s"] = result.get("warmup_s", 0.0) + generation_time("batch warm-up", 4, batch)
        batch_first = generation_time("batch first token", 1, batch)
        result["decode_batch_tok_s"] = batch * (new - 1) / (generation_time("batch decode", new, batch) - batch_first)
    result["peak_rss_mb"] = memory_mib("VmHWM")
    result["rss_growth_mb"] = result["peak_rss_mb"] - start_rss_mb
    return result


def run_system(spec: dict) -> dict:
    """The measurements of `spec["system"]`: one worker process, or two for a system built for a batch size (one
    sequence, then batches of N), whose warm-ups add up and whose peak memory is the larger; plus the weights'
    bytes read per second at batch 1 (`spec["decode_weight_bytes"]` per step)."""
    result = run_worker({**spec, "batch_only": False})
    if _is_sized(spec["system"]):
        batch = run_worker({**spec, "batch_only": True})
        result["warmup_s"] += batch["warmup_s"]
        result["decode_batch_tok_s"] = batch["decode_batch_tok_s"]
        for key in ("peak_rss_mb", "rss_growth_mb"):
            result[key] = max(result[key], batch[key])
    result["decode_b1_weights_gb_s"] = spec["decode_weight_bytes"] * result["decode_b1_tok_s"] / 1e9
    return result


def run_worker(spec: dict, module: str = "llama.bench") -> dict:
    """Run `module`'s worker on `spec` in a fresh Python process (see worker_or_cli); its result."""
    spec = {**spec, "launch_time": time.time()}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--worker"], input=json.dumps(spec), capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"benchmark worker for {spec['system']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


def summarize(reps: List[dict]) -> Dict[str, dict]:
    """Median, min and max of each metric over repetitions (None for a metric the system does not measure)."""
    return {
        key: {"median": statistics.median(values), "min": min(values), "max": max(values)}
        if None not in values
        else {"median": None, "min": None, "max": None}
        for key in reps[0]
        for values in [[rep[key] for rep in reps]]
    }


def _ratio(value: Optional[float], baseline: Optional[float]) -> Optional[float]:
    return None if value is None or baseline is None else value / baseline


def machine_line(info: dict, threads: int) -> str:
    """The machine as `machine()` describes it, in words: CPU, threads of cores, torch's version."""
    return f"{info['cpu']}, {threads} thread(s) of {info['cores']} core(s), torch {info['torch']}"


def table_head(description: str, header: List[str]) -> List[str]:
    """A markdown table's first lines: a line describing it, then its header."""
    return [description, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def _checkpoint_words(config: dict) -> str:
    """The checkpoint in words for a table's description: a shape's says its weights are random, and why that
    does not matter."""
    if not config.get("shape"):
        return ""
    return f"{config['shape']} shape with random weights (speed does not depend on the weights' values); "


def _row(label: str, cells: List[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def markdown_table(report: dict) -> str:
    """The results as a markdown table: a row per metric, a column per system, medians with min–max; then the
    weights a decode step reads and the memory growth over the checkpoint's size."""
    systems = list(report["systems"])
    baseline = "transformers" if "transformers" in systems else None
    m, config = report["machine"], report["config"]
    header = [f"metric (median of {config['reps']}, min–max)", *systems]
    header += [f"{s} / {baseline}" for s in systems if baseline and s != baseline]
    lines = table_head(
        f"{machine_line(m, config['threads'])}, transformers {m['transformers']}; {_checkpoint_words(config)}"
        f"{config['dtype']}, batch N = {config['batch']}, prompt {config['prompt_len']} + {config['new_tokens']} "
        f"new tokens, prefill {config['prefill_len']} tokens",
        header,
    )
    for key, (label, unit, _) in METRICS.items():
        stats = [report["systems"][s]["summary"][key] for s in systems]
        cells = [
            "–" if st["median"] is None else f"{st['median']:.3g} ({st['min']:.3g}–{st['max']:.3g})" for st in stats
        ]
        ratios = [report["ratios"][s][key] for s in systems if baseline and s != baseline]
        cells += ["–" if ratio is None else f"{ratio:.2f}x" for ratio in ratios]
        lines.append(_row(f"{label} ({unit})", cells))
    weights = [f"{report['systems'][s]['decode_weight_bytes'] / 1e9:.3g}" for s in systems]
    lines.append(_row("weights read per decode step (GB)", weights))
    growth = [report["systems"][s]["summary"]["rss_growth_mb"]["median"] / config["checkpoint_mb"] for s in systems]
    lines.append(_row(f"peak RSS above the start / checkpoint ({config['checkpoint_mb']:.0f} MB)", [f"{g:.2f}x" for g in growth]))
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> None:
    """A PNG of bar charts, one per metric, medians with min–max error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(report["systems"])
    columns = 4
    rows = -(-len(METRICS) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(METRICS) :]:
        ax.set_visible(False)
    for ax, (key, (label, unit, higher)) in zip(axes.flat, METRICS.items()):
        stats = [report["systems"][s]["summary"][key] for s in systems]
        stats = [st if st["median"] is not None else {"median": 0, "min": 0, "max": 0} for st in stats]  # no bar
        medians = [st["median"] for st in stats]
        errors = [[st["median"] - st["min"] for st in stats], [st["max"] - st["median"] for st in stats]]
        ax.bar(range(len(systems)), medians, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(systems))])
        ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{label}\n({unit}, {'higher' if higher else 'lower'} is better)", fontsize=8)
    fig.suptitle(f"{report['machine']['cpu']}, {report['config']['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _matrix_bytes(rows: int, columns: int, size: int, quantization: Optional[str]) -> int:
    """The bytes of a (rows, columns) weight of ours: `size` bytes a value; int8: a byte a value and a scale of
    `size` bytes a row; int4: half a byte a value and a bfloat16 scale and offset a group of input channels (see
    llama.quantized_linear)."""
    if quantization == "int8":
        return rows * columns + rows * size
    if quantization == "int4":
        group = next(g for g in INT4_GROUP_SIZES if columns % g == 0)
        return rows * columns // 2 + rows * (columns // group) * 2 * torch.bfloat16.itemsize
    return rows * columns * size


def decode_weight_bytes(args: ModelArgs, dtype: torch.dtype, quantization: Optional[str] = None) -> int:
    """The bytes of the weights a batch-1 decode step of ours reads, in `dtype` and quantized as `quantization`
    says (transformers' and llama-models' unquantized steps read as much): every linear layer's, the output
    projection's included (the embedding matrix, if tied), and the norms'; not the embedding table's, of which a
    step gathers one row."""
    total = 0
    for key, (shape, _) in parameter_layout(args).items():
        if key != EMBEDDING_KEY:
            total += _matrix_bytes(*shape, dtype.itemsize, quantization) if len(shape) == 2 else shape[0] * dtype.itemsize
    return total


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_GGUF_SCALAR_BYTES = {
    gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
    gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2,
    gguf.GGUFValueType.UINT32: 4, gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4,
    gguf.GGUFValueType.UINT64: 8, gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8,
}  # fmt: skip


def _gguf_value_end(data: mmap.mmap, offset: int, kind: int) -> int:
    """Where the GGUF metadata value of type `kind` that starts at `offset` ends."""
    if kind == gguf.GGUFValueType.STRING:
        return offset + 8 + _U64.unpack_from(data, offset)[0]
    if kind == gguf.GGUFValueType.ARRAY:
        item, count = struct.unpack_from("<IQ", data, offset)
        offset += 12
        if item in _GGUF_SCALAR_BYTES:
            return offset + count * _GGUF_SCALAR_BYTES[item]
        for _ in range(count):
            offset = _gguf_value_end(data, offset, item)
        return offset
    return offset + _GGUF_SCALAR_BYTES[kind]


def gguf_tensor_bytes(path: Path) -> Dict[str, int]:
    """Each tensor's bytes in the GGUF file `path` (version 2 or later), from the type and shape its header gives:
    gguf.GGUFReader's n_bytes, without its reading every metadata value (half a minute for Llama 3's tokenizer)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path} is not a GGUF file of version 2 or later")
        offset = 24
        for _ in range(n_kv):
            offset = _gguf_value_end(data, offset, gguf.GGUFValueType.STRING)  # the key
            offset = _gguf_value_end(data, offset + 4, _U32.unpack_from(data, offset)[0])
        sizes = {}
        for _ in range(n_tensors):
            name_start, offset = offset + 8, _gguf_value_end(data, offset, gguf.GGUFValueType.STRING)
            name = bytes(data[name_start:offset]).decode()
            (n_dims,) = _U32.unpack_from(data, offset)
            dims = struct.unpack_from(f"<{n_dims}Q", data, offset + 4)
            (kind,) = _U32.unpack_from(data, offset + 4 + 8 * n_dims)
            offset += 4 + 8 * n_dims + 12  # the dimensions, then the type and the data's offset
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            sizes[name] = math.prod(dims) // block * block_bytes
    return sizes


def gguf_decode_bytes(path: Path) -> int:
    """The bytes of the weights a llama.cpp decode step reads from the GGUF file `path`: every tensor's but the
    embedding table's (unless there is no output projection: the embedding matrix is then it) and the RoPE
    factors'."""
    sizes = gguf_tensor_bytes(path)
    skipped = {ROPE_FREQS_TENSOR, gguf_name(EMBEDDING_KEY) if gguf_name(OUTPUT_KEY) in sizes else ""}
    return sum(nbytes for name, nbytes in sizes.items() if name not in skipped)


def system_decode_bytes(system: str, spec: dict) -> int:
    """The bytes of the weights `system` reads a batch-1 decode step (see decode_weight_bytes, gguf_decode_bytes)."""
    if parse_system(system)[0] == "llama.cpp":
        return gguf_decode_bytes(Path(spec["gguf_paths"][system]))
    ckpt_dir = Path(spec["ckpt_dir"])
    quantization = _quantization(system) if system.startswith("ours") else None
    args = ModelArgs(**read_params(ckpt_dir))
    return decode_weight_bytes(args, getattr(torch, spec["dtype"]), quantization or read_quantization(ckpt_dir))


@contextlib.contextmanager
def _export_dir(shape: Optional[str]) -> Iterator[Path]:
    """Where the peers' exports go: a shape's beside its checkpoint in the cache, kept for later runs; any other
    checkpoint's in a temporary directory, removed after the run."""
    if shape:
        yield shape_dir(shape).parent
    else:
        with tempfile.TemporaryDirectory(prefix="llama-bench-") as tmp:
            yield Path(tmp)


def _export_bytes(args: ModelArgs, tied: bool, export: str, dtype: str) -> int:
    """The size of export `export` ("hf" in `dtype`, else a GGUF file type) of the model `args` describes."""
    if export == "hf":
        size = getattr(torch, dtype).itemsize
        return stored_bytes(args, tied=tied, matrix=size, vector=size)
    block, type_size = gguf.GGML_QUANT_SIZES[FILE_TYPES[export][0]]
    return stored_bytes(args, tied=tied, matrix=type_size / block, vector=4)  # norms in F32


def _check_room(shape: Optional[str], source: Path, export_dir: Path, exports: Dict[str, Path], dtype: str) -> None:
    """A one-line error, before anything is written, if `export_dir`'s disk has no room for those of `exports` not
    written yet, and a shape's checkpoint `source` if it is not either."""
    if shape:
        args, tied = ModelArgs(**shape_named(shape).params), shape_named(shape).tied
    else:
        args, tied = ModelArgs(**read_params(source)), False  # a tied output counted: room to spare
    sizes = {path: _export_bytes(args, tied, export, dtype) for export, path in exports.items()}
    if shape:
        sizes[source] = stored_bytes(args, tied=tied, matrix=WEIGHT_DTYPE.itemsize, vector=WEIGHT_DTYPE.itemsize)
    check_free_space(
        export_dir,
        sum(nbytes for path, nbytes in sizes.items() if not is_built(path)),
        f"the {shape} checkpoint and its exports" if shape else "the exports for the peers",
        f"set {'LLAMA_CACHE' if shape else 'TMPDIR'} to a folder on a larger disk",
    )


def _export(ckpt_dir: Path, export: str, path: Path, *, dtype: str) -> None:
    if export == "hf":
        export_hf(ckpt_dir, path, dtype=dtype)
    else:
        export_gguf(ckpt_dir, path, export)


def prepare_checkpoint(
    ckpt_dir: Optional[str], shape: Optional[str], export_dir: Path, dtype: str, exports: Sequence[str]
) -> Tuple[Path, Dict[str, Path]]:
    """The checkpoint to measure (the shape's, written once into the cache; else `ckpt_dir` or the demo model)
    and its `exports` for the peers ("hf" for a Hugging Face directory in `dtype`, GGUF file types) in
    `export_dir`, each written unless it is there already."""
    source = shape_dir(shape) if shape else Path(ckpt_dir or demo_checkpoint_dir())
    stem = shape or "model"
    paths = {e: export_dir / (f"{stem}-hf-{dtype}" if e == "hf" else f"{stem}-{e}.gguf") for e in exports}
    _check_room(shape, source, export_dir, paths, dtype)
    if shape:
        shape_checkpoint(shape)
    for export, path in paths.items():
        built_once(path, functools.partial(_export, source, export, dtype=dtype))
    return source, paths


def _checked_systems(systems: Sequence[str]) -> List[str]:
    """--systems as a list, each name checked and each peer's package installed."""
    systems = systems.split(",") if isinstance(systems, str) else list(systems)
    for system in systems:
        parse_system(system)
    check_installed(dict.fromkeys(parse_system(s)[0] for s in systems))
    return systems


def _gguf_types(systems: Sequence[str], dtype: str) -> Dict[str, str]:
    """The GGUF file type each llama.cpp system among `systems` runs."""
    types = {s: parse_system(s)[1] or GGUF_FILE_TYPES.get(dtype) for s in systems if s.startswith("llama.cpp")}
    if None in types.values():
        raise ValueError(f"llama.cpp has no {dtype} weights: use --dtype {' or '.join(GGUF_FILE_TYPES)}")
    return types


def _measure(spec: dict, systems: Sequence[str], reps: int, weight_bytes: Dict[str, int]) -> Dict[str, List[dict]]:
    """Each system's results, `reps` times, systems alternating; each printed as it comes."""
    runs: Dict[str, List[dict]] = {s: [] for s in systems}
    for rep in range(reps):
        for system in systems:
            runs[system].append(run_system({**spec, "system": system, "decode_weight_bytes": weight_bytes[system]}))
            measured = ", ".join(f"{k} {v:.3g}" for k, v in runs[system][-1].items() if v is not None)
            print(f"rep {rep + 1}/{reps} {system}: {measured}", file=sys.stderr)
    return runs


def _report(config: dict, runs: Dict[str, List[dict]], weight_bytes: Dict[str, int]) -> dict:
    """The JSON report: the machine, the run's settings, each system's results and summary, ratios to
    transformers."""
    report = {
        "machine": machine(),
        "config": config,
        "systems": {
            s: {"decode_weight_bytes": weight_bytes[s], "reps": r, "summary": summarize(r)} for s, r in runs.items()
        },
    }
    medians = {s: {key: st["median"] for key, st in r["summary"].items()} for s, r in report["systems"].items()}
    report["ratios"] = {
        s: {key: _ratio(medians[s][key], medians["transformers"][key]) for key in METRICS}
        for s in runs
        if s != "transformers" and "transformers" in runs
    }
    return report


def bench(
    ckpt_dir: Optional[str] = None,
    shape: Optional[str] = None,
    dtype: Optional[str] = None,
    systems: Optional[Sequence[str]] = None,
    reps: int = 5,
    prompt_len: int = 32,
    new_tokens: int = 128,
    prefill_len: int = 512,
    batch: int = 8,
    threads: Optional[int] = None,
    out: Optional[str] = "bench.json",
    plot: Optional[str] = "bench.png",
) -> None:
    """Benchmark this repo against its peers on one checkpoint, in the same run.

    The demo model unless --ckpt_dir or --shape. Prints a markdown table, writes a JSON report (--out) and a plot
    (--plot).

    --shape llama3.2-1b, llama3.2-3b or llama3.1-8b: a Meta checkpoint of that model's exact shape with seeded
    random bfloat16 weights (speed does not depend on the weights' values), written once into the cache
    ($LLAMA_CACHE, else ~/.cache/llama) beside its exports for the peers. --dtype: float32 (bfloat16 with --shape,
    the checkpoint's own), bfloat16 or float16.

    --systems: ours, ours+int8, ours+int4, ours+compile, ours+int8+compile, ours+int4+compile, transformers (the
    baseline), llama-models (Meta's reference), llama.cpp, llama.cpp+q8_0 and llama.cpp+q4_0 (llama-cpp-python,
    if installed). Default: ours,transformers; with --shape, ours, its int8 and int4, transformers and the three
    llama.cpp ones.
    """
    if shape is not None and ckpt_dir is not None:
        raise ValueError("pass --shape or --ckpt_dir, not both: --shape measures a checkpoint of its own")
    if shape is not None:
        shape_named(shape)  # a clear error if unknown
    systems = _checked_systems(systems or (SHAPE_SYSTEMS if shape else DEFAULT_SYSTEMS))
    no_plot = 'no plot: it needs matplotlib (pip install -e ".[bench]")'
    if plot and not _installed("matplotlib"):
        print(no_plot, file=sys.stderr)  # now, and again after the table
        plot = None
    else:
        no_plot = None
    dtype = dtype or ("bfloat16" if shape else "float32")
    dtype = str(pick_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")  # a clear error if unknown
    gguf_types = _gguf_types(systems, dtype)
    if reps < 1 or min(prompt_len, new_tokens, prefill_len, batch) < 2:
        raise ValueError("reps must be >= 1 and the prompt, token, prefill and batch counts >= 2")
    exports = ["hf"] * ("transformers" in systems) + list(dict.fromkeys(gguf_types.values()))
    with _export_dir(shape) as export_dir:
        source, paths = prepare_checkpoint(ckpt_dir, shape, export_dir, dtype, exports)
        params = read_params(source)
        checkpoint_bytes = sum(path.stat().st_size for path in shard_paths(source))
        config = {
            "ckpt_dir": str(source), "shape": shape, "dtype": dtype, "reps": reps, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "prefill_len": prefill_len, "batch": batch,
            "threads": threads or torch.get_num_threads(), "checkpoint_mb": checkpoint_bytes / 2**20,
        }
        spec = {
            **config, "vocab_size": params["vocab_size"], "max_seq_len": max(prefill_len, prompt_len + new_tokens) + 1,
            "hf_dir": str(paths["hf"]) if "hf" in paths else None,
            "gguf_paths": {system: str(paths[file_type]) for system, file_type in gguf_types.items()},
        }
        weight_bytes = {system: system_decode_bytes(system, spec) for system in systems}
        report = _report(config, _measure(spec, systems, reps, weight_bytes), weight_bytes)
    print(markdown_table(report))
    if out:
        write_atomically(Path(out), lambda path: path.write_text(json.dumps(report, indent=2)))
    if plot:
        write_atomically(Path(plot), lambda path: write_plot(report, path))
    elif no_plot:
        print(no_plot, file=sys.stderr)


def worker_or_cli(worker_fn: Callable[[dict], dict], command: Callable) -> None:
    """A benchmark module's entry point: with `--worker`, `worker_fn` on the spec read from stdin, its result
    printed for run_worker; otherwise `command` as a command line."""
    if sys.argv[1:] == ["--worker"]:
        print(RESULT_MARK + json.dumps(worker_fn(json.load(sys.stdin))), flush=True)
        return
    from .command import run_cli

    run_cli(command)


def main() -> None:
    worker_or_cli(worker, bench)


if __name__ == "__main__":
    main()
