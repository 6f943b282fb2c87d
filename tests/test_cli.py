"""One `llama` command for every tool (`python -m llama` the same), short helps, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama.cli import COMMANDS

ROOT = Path(__file__).parent.parent
TOOLS = ["chat", "serve", "convert", "reshard", "quantize", "eval", "bench", "bench_serve", "bench_speculation", "soak"]


def run(*args: str, module: str = "llama") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PAGER": "cat"})


def help_of(*args: str, module: str = "llama") -> str:
    result = run(*args, "--help", module=module)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr  # fire shows help on stderr when not on a terminal


def test_every_tool_is_a_subcommand():
    assert list(COMMANDS) == TOOLS
    listing = help_of()
    assert all(f"\n     {tool}\n" in listing for tool in TOOLS), listing
    conversions = help_of("convert")
    assert all(name in conversions for name in ("from_gguf", "from_hf", "to_hf", "to_gguf"))


@pytest.mark.parametrize("tool", [tool for tool in TOOLS if tool != "convert"])
def test_each_help_says_what_the_tool_does_in_a_line(tool):
    help_text = help_of(tool)
    description = help_text.split("DESCRIPTION\n", 1)[1].split("\n\n", 1)[0] if "DESCRIPTION" in help_text else ""
    summary = help_text.split("NAME\n", 1)[1].split("\n\n", 1)[0]
    assert f"llama {tool} - " in summary and len(summary) < 200 and len(description) < 400, help_text


def test_user_mistakes_are_one_line_errors(tmp_path):
    for args in (["reshard", "--ckpt_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "o"),
                  "--model_parallel_size", "1"],
                 ["eval", "--ckpt_dir", str(tmp_path), "--text", str(tmp_path / "missing.txt")],
                 ["quantize", "--ckpt_dir", str(tmp_path), "--out_dir", str(tmp_path / "q"), "--method", "int3"]):
        result = run(*args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


def test_old_entry_points_still_work(tiny_ckpt, tmp_path):
    out = tmp_path / "int8"
    result = run("write", "--ckpt_dir", str(tiny_ckpt), "--out_dir", str(out), module="llama.quantize")
    assert result.returncode == 0 and f"wrote a quantized checkpoint to {out}" in result.stdout, result.stderr
    assert (out / "quantization.json").is_file()
    assert "perplexity" in help_of("evaluate", module="llama.quantize").lower()


def test_a_writer_says_once_where_it_wrote(tiny_ckpt, tmp_path):
    out = tmp_path / "resharded"
    result = run("reshard", "--ckpt_dir", str(tiny_ckpt), "--out_dir", str(out), "--model_parallel_size", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote 2 shard(s) to {out}\n"
