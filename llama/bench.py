"""`python -m llama.bench`: load time, time to first token, prefill and decode speed, and peak memory of this
repo's model next to transformers' LlamaForCausalLM on the same weights and dtype.

Every measurement runs in a fresh worker process per system and repetition (so load time, process start to
first token and peak RSS are those of a cold process), systems alternating A B A B. Each worker warms up
before timing. Systems whose build takes a batch size (ours, llama-models) are built for one sequence, as the
chat is, and for the batch-N figure built for N in a second worker. Generation is greedy and always runs the
full number of tokens (stop tokens are ignored). Prompts are random token ids with a fixed seed.
"""

import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .checkpoint import ShardedCheckpoint, read_params, shard_paths, write_atomically
from .demo import demo_checkpoint_dir
from .generation import Llama
from .gguf_export import export_gguf
from .hf import export_hf
from .model import ModelArgs
from .parallel import init_model_parallel, pick_dtype
from .quantized_linear import QUANTIZATIONS
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
    "peak_rss_mb": ("peak RSS", "MB", False),
    "rss_growth_mb": ("peak RSS above the worker's start", "MB", False),
}
RESULT_MARK = "BENCH_RESULT "
# Systems and their options (`ours+int8`): this repo (weight-quantized, with a compiled decode step, or both),
# transformers, Meta's llama-models reference, llama.cpp through llama-cpp-python (Q8_0 weights).
SYSTEM_OPTIONS = {
    "ours": ("int8", "int4", "compile", "int8+compile", "int4+compile"),
    "transformers": (),
    "llama-models": (),
    "llama.cpp": ("q8_0",),
}
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


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _Ours:
    """This repo's Llama, generating through the public `generate`."""

    sized = True  # built for `batch` sequences at most

    def __init__(self, spec: dict, batch: int):
        options = set((parse_system(spec["system"])[1] or "").split("+"))
        quantize = next(iter(options & set(QUANTIZATIONS)), None)
        self.llama = Llama.build(
            spec["ckpt_dir"], max_seq_len=spec["max_seq_len"], max_batch_size=batch, dtype=spec["dtype"],
            device="cpu", quantize=quantize, compile="compile" in options,
        )
        self.llama.tokenizer.stop_tokens = set()  # always generate the full length

    def generate(self, prompts: List[List[int]], new_tokens: int) -> None:
        self.llama.generate(prompts, new_tokens, temperature=0)


class _Transformers:
    """transformers' LlamaForCausalLM (sdpa attention) loaded from a Hugging Face export of the same weights."""

    def __init__(self, spec: dict, batch: int):
        from transformers import LlamaForCausalLM

        dtype = getattr(torch, spec["dtype"])
        self.model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=dtype, attn_implementation="sdpa").eval()

    def generate(self, prompts: List[List[int]], new_tokens: int) -> None:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0,
            )


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

    def generate(self, prompts: List[List[int]], new_tokens: int) -> None:
        tokens = torch.tensor(prompts)
        logits = self.model.forward(tokens, 0)
        for position in range(tokens.shape[1], tokens.shape[1] + new_tokens - 1):
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (bs, 1)
            logits = self.model.forward(next_token, position)


class _LlamaCpp:
    """llama.cpp through llama-cpp-python, on a GGUF written from the same checkpoint (`export_gguf`). Its Python
    API runs one sequence at a time, so it has no batch-N figure."""

    batched = False

    def __init__(self, spec: dict, batch: int):
        from llama_cpp import Llama as LlamaCpp

        self.model = LlamaCpp(
            model_path=spec["gguf_paths"][spec["system"]], n_ctx=spec["max_seq_len"], n_batch=spec["max_seq_len"],
            n_threads=spec["threads"], verbose=False,
        )

    def generate(self, prompts: List[List[int]], new_tokens: int) -> None:
        for prompt in prompts:
            tokens = self.model.generate(prompt, temp=0, top_k=1, reset=True)
            for _, _ in zip(range(new_tokens), tokens):
                pass


SYSTEM_CLASSES = {"ours": _Ours, "transformers": _Transformers, "llama-models": _LlamaModels, "llama.cpp": _LlamaCpp}


def _is_sized(system: str) -> bool:
    """Whether `system`'s build takes a batch size (measured by two workers, see run_system)."""
    return getattr(SYSTEM_CLASSES[parse_system(system)[0]], "sized", False)


def worker(spec: dict) -> dict:
    """Load one system in this (fresh) process and time it as `spec` says; with `batch_only`, only the batch-N
    figure, built for N (see run_system)."""
    torch.set_num_threads(spec["threads"])
    gen = torch.Generator().manual_seed(0)
    vocab = spec["vocab_size"]

    def prompts(batch: int, length: int) -> List[List[int]]:
        return torch.randint(0, vocab, (batch, length), generator=gen).tolist()

    short, batch = prompts(1, spec["prompt_len"]), prompts(spec["batch"], spec["prompt_len"])
    new = spec["new_tokens"]
    start_rss_mb = memory_mib("VmRSS")  # Python, torch and this repo imported
    system_class, sized = SYSTEM_CLASSES[parse_system(spec["system"])[0]], _is_sized(spec["system"])
    long = prompts(1, spec["prefill_len"])
    if spec["batch_only"]:
        system, result = system_class(spec, spec["batch"]), {}
        system.generate(long, 1)  # untimed, as in the other worker: large buffers freed before the batch
    else:
        start = time.perf_counter()
        system = system_class(spec, 1 if sized else spec["batch"])
        result = {"load_s": time.perf_counter() - start}
        system.generate(short, 1)
        result["start_to_first_token_s"] = time.time() - spec["launch_time"]
        result["warmup_s"] = _timed(lambda: [system.generate(long, 1), system.generate(short, 4)])
        result["ttft_s"] = _timed(lambda: system.generate(short, 1))
        result["prefill_tok_s"] = spec["prefill_len"] / _timed(lambda: system.generate(long, 1))
        decode_time = _timed(lambda: system.generate(short, new)) - result["ttft_s"]
        result["decode_b1_tok_s"] = (new - 1) / decode_time
        result["decode_batch_tok_s"] = None
    if spec["batch_only"] or (not sized and getattr(system_class, "batched", True)):
        result["warmup_s"] = result.get("warmup_s", 0.0) + _timed(lambda: system.generate(batch, 4))
        batch_first = _timed(lambda: system.generate(batch, 1))
        batch_decode_time = _timed(lambda: system.generate(batch, new)) - batch_first
        result["decode_batch_tok_s"] = spec["batch"] * (new - 1) / batch_decode_time
    result["peak_rss_mb"] = memory_mib("VmHWM")
    result["rss_growth_mb"] = result["peak_rss_mb"] - start_rss_mb
    return result


def run_system(spec: dict) -> dict:
    """The measurements of `spec["system"]`: one worker process, or two for a system built for a batch size (one
    sequence, then batches of N), whose warm-ups add up and whose peak memory is the larger."""
    result = run_worker({**spec, "batch_only": False})
    if _is_sized(spec["system"]):
        batch = run_worker({**spec, "batch_only": True})
        result["warmup_s"] += batch["warmup_s"]
        result["decode_batch_tok_s"] = batch["decode_batch_tok_s"]
        for key in ("peak_rss_mb", "rss_growth_mb"):
            result[key] = max(result[key], batch[key])
    return result


def run_worker(spec: dict) -> dict:
    """Run `worker(spec)` in a fresh Python process; its result."""
    spec = {**spec, "launch_time": time.time()}
    proc = subprocess.run(
        [sys.executable, "-m", "llama.bench", "--worker"], input=json.dumps(spec), capture_output=True, text=True
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


def markdown_table(report: dict) -> str:
    """The results as a markdown table: a row per metric, a column per system, medians with min–max."""
    systems = list(report["systems"])
    baseline = "transformers" if "transformers" in systems else None
    m, config = report["machine"], report["config"]
    header = [f"metric (median of {config['reps']}, min–max)", *systems]
    header += [f"{s} / {baseline}" for s in systems if baseline and s != baseline]
    lines = table_head(
        f"{machine_line(m, config['threads'])}, transformers {m['transformers']}; {config['dtype']}, batch N = "
        f"{config['batch']}, prompt {config['prompt_len']} + {config['new_tokens']} new tokens, prefill "
        f"{config['prefill_len']} tokens",
        header,
    )
    for key, (label, unit, _) in METRICS.items():
        stats = [report["systems"][s]["summary"][key] for s in systems]
        cells = [
            "–" if st["median"] is None else f"{st['median']:.3g} ({st['min']:.3g}–{st['max']:.3g})" for st in stats
        ]
        ratios = [report["ratios"][s][key] for s in systems if baseline and s != baseline]
        cells += ["–" if ratio is None else f"{ratio:.2f}x" for ratio in ratios]
        lines.append(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    growth = [report["systems"][s]["summary"]["rss_growth_mb"]["median"] / config["checkpoint_mb"] for s in systems]
    lines.append(
        f"| peak RSS above the start / checkpoint ({config['checkpoint_mb']:.0f} MB) | "
        + " | ".join(f"{g:.2f}x" for g in growth) + " |"
    )
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


def bench(
    ckpt_dir: Optional[str] = None,
    dtype: str = "float32",
    systems: Sequence[str] = ("ours", "transformers"),
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

    The demo model unless --ckpt_dir. Prints a markdown table, writes a JSON report (--out) and a plot (--plot).
    --systems: ours, ours+int8, ours+int4, ours+compile, ours+int8+compile, ours+int4+compile, transformers (the
    baseline), llama-models (Meta's reference), llama.cpp and llama.cpp+q8_0 (llama-cpp-python, if installed).
    """
    if isinstance(systems, str):
        systems = systems.split(",")
    for system in systems:
        parse_system(system)
    check_installed(dict.fromkeys(parse_system(s)[0] for s in systems))
    no_plot = 'no plot: it needs matplotlib (pip install -e ".[bench]")'
    if plot and not _installed("matplotlib"):
        print(no_plot, file=sys.stderr)  # now, and again after the table
        plot = None
    else:
        no_plot = None
    dtype_name = str(pick_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")  # a clear error if unknown
    gguf_types = {  # the GGUF file type each llama.cpp system runs
        s: parse_system(s)[1] or GGUF_FILE_TYPES.get(dtype_name) for s in systems if s.startswith("llama.cpp")
    }
    if None in gguf_types.values():
        raise ValueError(f"llama.cpp has no {dtype} weights: use --dtype {' or '.join(GGUF_FILE_TYPES)}")
    if reps < 1 or min(prompt_len, new_tokens, prefill_len, batch) < 2:
        raise ValueError("reps must be >= 1 and the prompt, token, prefill and batch counts >= 2")
    ckpt_dir = str(ckpt_dir or demo_checkpoint_dir())
    params = read_params(Path(ckpt_dir))
    threads = threads or torch.get_num_threads()
    checkpoint_bytes = sum(path.stat().st_size for path in shard_paths(Path(ckpt_dir)))
    config = {
        "ckpt_dir": ckpt_dir, "dtype": dtype, "reps": reps, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_len": prefill_len, "batch": batch, "threads": threads, "checkpoint_mb": checkpoint_bytes / 2**20,
    }
    spec = {
        **config, "vocab_size": params["vocab_size"],
        "max_seq_len": max(prefill_len, prompt_len + new_tokens) + 1,
    }
    runs: Dict[str, List[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as tmp:
        if "transformers" in systems:
            spec["hf_dir"] = str(export_hf(ckpt_dir, Path(tmp) / "hf", dtype=dtype))
        paths = {t: str(export_gguf(ckpt_dir, Path(tmp) / f"model-{t}.gguf", t)) for t in set(gguf_types.values())}
        spec["gguf_paths"] = {system: paths[file_type] for system, file_type in gguf_types.items()}
        for rep in range(reps):
            for system in systems:
                runs[system].append(run_system({**spec, "system": system}))
                measured = ", ".join(f"{k} {v:.3g}" for k, v in runs[system][-1].items() if v is not None)
                print(f"rep {rep + 1}/{reps} {system}: {measured}", file=sys.stderr)
    report = {
        "machine": machine(),
        "config": config,
        "systems": {s: {"reps": r, "summary": summarize(r)} for s, r in runs.items()},
    }
    medians = {s: {key: st["median"] for key, st in r["summary"].items()} for s, r in report["systems"].items()}
    report["ratios"] = {
        s: {key: _ratio(medians[s][key], medians["transformers"][key]) for key in METRICS}
        for s in systems
        if s != "transformers" and "transformers" in systems
    }
    print(markdown_table(report))
    if out:
        write_atomically(Path(out), lambda path: path.write_text(json.dumps(report, indent=2)))
    if plot:
        write_atomically(Path(plot), lambda path: write_plot(report, path))
    elif no_plot:
        print(no_plot, file=sys.stderr)


def main() -> None:
    if sys.argv[1:] == ["--worker"]:
        print(RESULT_MARK + json.dumps(worker(json.load(sys.stdin))), flush=True)
        return
    from .command import run_cli

    run_cli(bench)


if __name__ == "__main__":
    main()
