"""`python -m llama.bench_speculation`: greedy decoding speed with and without speculation, on an editing task
(a function of about 400 tokens, to be returned with one name changed: the answer mostly repeats the prompt,
where prompt lookup pays) and on a plain chat question (where drafts are rarely right, so speculation can only
cost), next to llama.cpp with and without its prompt lookup (llama-cpp-python's LlamaPromptLookupDecoding).

Every system and repetition runs in a fresh worker process, systems alternating; each worker warms up first.
Every system generates the same number of tokens (stop tokens are ignored). Decode speed is (tokens - 1) over
the time after the first token.
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .bench import check_installed, machine, machine_line, run_worker, table_head, worker_or_cli
from .chat_format import chat_format_for
from .checkpoint import write_atomically
from .demo import demo_checkpoint_dir
from .generation import Llama
from .gguf_export import export_gguf
from .tokenizer import Tokenizer

SYSTEMS = ("ours", "ours+lookup", "llama.cpp", "llama.cpp+lookup")
PACKAGES = {s: ("llama_cpp", "pip install llama-cpp-python (it compiles llama.cpp)") for s in SYSTEMS[2:]}
GGUF_FILE_TYPES = {"float32": "f32", "bfloat16": "bf16"}

EDIT_SOURCE = '''def summarize_requests(log_lines, slow_ms=500, top=5):
    """Count requests per endpoint in an access log and report the slowest ones."""
    counts = {}
    durations = {}
    statuses = {}
    slow = []
    for line in log_lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 4:
            raise ValueError(f"malformed log line: {line!r}")
        method, path, status, elapsed = parts[0], parts[1], int(parts[2]), float(parts[3])
        endpoint = f"{method} {path.split('?')[0]}"
        counts[endpoint] = counts.get(endpoint, 0) + 1
        durations.setdefault(endpoint, []).append(elapsed)
        status_class = f"{status // 100}xx"
        statuses[status_class] = statuses.get(status_class, 0) + 1
        if elapsed >= slow_ms:
            slow.append((elapsed, endpoint, status))
    report = []
    for endpoint in sorted(counts, key=lambda e: -counts[e]):
        times = sorted(durations[endpoint])
        middle = times[len(times) // 2]
        worst = times[-1]
        report.append(f"{endpoint}: {counts[endpoint]} requests, median {middle:.1f} ms, worst {worst:.1f} ms")
    slow.sort(reverse=True)
    for elapsed, endpoint, status in slow[:top]:
        report.append(f"slow: {endpoint} took {elapsed:.1f} ms (status {status})")
    for status_class in sorted(statuses):
        share = 100 * statuses[status_class] / sum(statuses.values())
        report.append(f"{status_class}: {statuses[status_class]} responses ({share:.1f}%)")
    return "\\n".join(report)
'''
EDIT_REQUEST = (
    "Here is a Python function:\n\n{source}\nRewrite it with the variable `durations` renamed to `timings`. "
    "Reply with the whole function only."
)
CHAT_REQUEST = "Tell me about the history of the city of Paris."


def workload_prompts(ckpt_dir: str) -> Dict[str, List[int]]:
    """The chat prompt of each workload ("edit" and "chat") in the model's chat format."""
    formatter = chat_format_for(Tokenizer(str(Path(ckpt_dir) / "tokenizer.model")))
    texts = {"edit": EDIT_REQUEST.format(source=EDIT_SOURCE), "chat": CHAT_REQUEST}
    return {w: formatter.encode_dialog_prompt([{"role": "user", "content": text}]) for w, text in texts.items()}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(spec: dict) -> dict:
    """Build one system in this (fresh) process and time decoding on each workload."""
    torch.set_num_threads(spec["threads"])
    prompts = workload_prompts(spec["ckpt_dir"])
    if spec["system"].startswith("llama.cpp"):
        generate = _llama_cpp_generate(spec)
    else:
        ours = Llama.build(
            spec["ckpt_dir"], max_seq_len=spec["max_seq_len"], max_batch_size=1, dtype=spec["dtype"], device="cpu",
            speculate="lookup" if spec["system"] == "ours+lookup" else None, speculate_tokens=spec["draft_tokens"],
        )
        ours.tokenizer.stop_tokens = set()  # always the full length

        def generate(prompt: List[int], count: int) -> None:
            ours.generate([prompt], count, temperature=0)

    result = {}
    for workload, prompt in prompts.items():
        generate(prompt, 8)  # warm-up
        first = _timed(lambda: generate(prompt, 1))
        total = _timed(lambda: generate(prompt, spec["new_tokens"]))
        result[f"{workload}_tok_s"] = (spec["new_tokens"] - 1) / max(total - first, 1e-9)
    if spec["system"] == "ours+lookup":
        result["accepted"] = ours.engine.accepted / max(ours.engine.drafted, 1)
    return result


def _llama_cpp_generate(spec: dict):
    from llama_cpp import Llama as LlamaCpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    lookup = spec["system"].endswith("lookup")
    draft = LlamaPromptLookupDecoding(num_pred_tokens=spec["draft_tokens"]) if lookup else None
    model = LlamaCpp(
        model_path=spec["gguf_path"], n_ctx=spec["max_seq_len"], n_batch=spec["max_seq_len"],
        n_threads=spec["threads"], draft_model=draft, verbose=False,
    )

    def generate(prompt: List[int], count: int) -> None:
        for _, _ in zip(range(count), model.generate(prompt, temp=0, top_k=1, reset=True)):
            pass

    return generate


def markdown_table(report: dict) -> str:
    systems, config = list(report["systems"]), report["config"]
    medians = {s: report["systems"][s]["median"] for s in systems}
    lines = table_head(
        f"{machine_line(report['machine'], config['threads'])}; {config['dtype']}, greedy, {config['new_tokens']} "
        f"tokens, {config['draft_tokens']} drafts a step, median of {config['reps']}",
        ["decode tok/s", *systems, "ours+lookup / ours", "ours+lookup / llama.cpp+lookup"],
    )
    for workload in ("edit", "chat"):
        key = f"{workload}_tok_s"
        cells = [f"{medians[s][key]:.3g}" if s in medians else "–" for s in systems]
        ratios = [
            _ratio(medians, "ours+lookup", "ours", key), _ratio(medians, "ours+lookup", "llama.cpp+lookup", key)
        ]
        lines.append(f"| {workload} | " + " | ".join(cells + ratios) + " |")
    if "ours+lookup" in medians:
        lines.append(f"\nours+lookup: {medians['ours+lookup']['accepted']:.0%} of drafts accepted")
    return "\n".join(lines)


def _ratio(medians: Dict[str, dict], system: str, baseline: str, key: str) -> str:
    if system not in medians or baseline not in medians:
        return "–"
    return f"{medians[system][key] / medians[baseline][key]:.2f}x"


def bench_speculation(
    ckpt_dir: Optional[str] = None,
    dtype: str = "float32",
    systems: Sequence[str] = SYSTEMS,
    reps: int = 3,
    new_tokens: int = 400,
    draft_tokens: int = 8,
    threads: Optional[int] = None,
    out: Optional[str] = "bench-speculation.json",
) -> None:
    """Benchmark prompt-lookup speculative decoding against plain decoding, ours and llama.cpp's.

    Greedy, on an editing task and a chat question; the demo model unless --ckpt_dir; --systems from ours,
    ours+lookup, llama.cpp, llama.cpp+lookup."""
    if isinstance(systems, str):
        systems = systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system {unknown[0]!r}: use {', '.join(SYSTEMS)}")
    if dtype not in GGUF_FILE_TYPES:
        raise ValueError(f"--dtype must be one of {', '.join(GGUF_FILE_TYPES)}")
    if reps < 1 or new_tokens < 2 or draft_tokens < 1:
        raise ValueError("reps and draft_tokens must be >= 1 and new_tokens >= 2")
    check_installed(systems, PACKAGES)
    ckpt_dir = str(ckpt_dir or demo_checkpoint_dir())
    threads = threads or torch.get_num_threads()
    config = {"ckpt_dir": ckpt_dir, "dtype": dtype, "reps": reps, "new_tokens": new_tokens,
              "draft_tokens": draft_tokens, "threads": threads}
    spec = {**config, "max_seq_len": 1024 + new_tokens}
    runs: Dict[str, List[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as tmp:
        if any(s.startswith("llama.cpp") for s in systems):
            spec["gguf_path"] = str(export_gguf(ckpt_dir, Path(tmp) / "model.gguf", GGUF_FILE_TYPES[dtype]))
        for rep in range(reps):
            for system in systems:
                runs[system].append(run_worker({**spec, "system": system}, "llama.bench_speculation"))
                print(f"rep {rep + 1}/{reps} {system}: {runs[system][-1]}", file=sys.stderr)
    report = {
        "machine": machine(),
        "config": config,
        "systems": {
            s: {"reps": r, "median": {k: statistics.median(rep[k] for rep in r) for k in r[0]}} for s, r in runs.items()
        },
    }
    print(markdown_table(report))
    if out:
        write_atomically(Path(out), lambda path: path.write_text(json.dumps(report, indent=2)))


def main() -> None:
    worker_or_cli(worker, bench_speculation)


if __name__ == "__main__":
    main()
