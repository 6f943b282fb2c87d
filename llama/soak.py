"""Soak test: many chat completions in one process must not grow resident memory.

    python -m llama.soak [--ckpt_dir DIR] [--completions 300] [--warmup 20] [--max_growth 0.05]

Runs `warmup` completions, notes resident memory, runs `completions` more (varied dialogs, batch sizes and
lengths), and reports the growth. Exits 1 if it exceeds `max_growth` (5% by default). Uses the demo model
unless --ckpt_dir is given.
"""

import json
import sys
import time
from typing import Optional

from .command import run_cli
from .generation import Llama

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
]


def memory_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (Linux) in MiB: `VmRSS` now, or `VmHWM` at its peak so far."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def soak(
    ckpt_dir: Optional[str] = None,
    completions: int = 300,
    warmup: int = 20,
    max_gen_len: int = 24,
    max_growth: float = 0.05,
    out: Optional[str] = None,
) -> None:
    """Run many completions and report how much resident memory grew (optionally as JSON, --out)."""
    if ckpt_dir is None:
        from .demo import demo_checkpoint_dir

        ckpt_dir = str(demo_checkpoint_dir())
    generator = Llama.build(ckpt_dir, max_seq_len=256, max_batch_size=3, device="cpu")
    start = time.time()
    baseline = 0.0
    for i in range(warmup + completions):
        if i == warmup:
            baseline = memory_mib()
        batch = 1 + i % 3
        dialogs = [[{"role": "user", "content": QUESTIONS[(i + j) % len(QUESTIONS)]}] for j in range(batch)]
        generator.chat_completion(dialogs, temperature=0.7, top_p=0.9, max_gen_len=max_gen_len - i % 8)
    growth = memory_mib() / baseline - 1
    result = {
        "completions": completions,
        "rss_after_warmup_mib": baseline,
        "rss_growth": growth,
        "seconds": time.time() - start,
    }
    print(f"{completions} chat completions: resident memory {baseline:.0f} MiB after warm-up, growth {growth:+.2%}")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    if growth > max_growth:
        print(f"FAIL: growth above {max_growth:.0%}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(soak)
