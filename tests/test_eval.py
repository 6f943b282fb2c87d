"""`llama eval`: perplexity of a checkpoint on a text, in a dtype and quantized."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.eval import evaluate, perplexity

ROOT = Path(__file__).parent.parent
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def test_perplexity_is_the_exponent_of_the_mean_negative_log_likelihood(tiny_ckpt, tokenizer):
    generator = Llama.build(tiny_ckpt, max_seq_len=32, max_batch_size=1, dtype="float32")
    tokens = tokenizer.encode(TEXT, bos=False, eos=False)[:40]
    with torch.inference_mode():
        first = torch.log_softmax(generator.model.forward(torch.tensor([tokens[:32]]), 0)[0], dim=-1)
        second = torch.log_softmax(generator.model.forward(torch.tensor([tokens[31:]]), 0)[0], dim=-1)
    nll = -sum(first[i, tokens[i + 1]] for i in range(31)) - sum(second[i, tokens[32 + i]] for i in range(8))
    assert perplexity(generator.model, tokens, 32) == pytest.approx(math.exp(nll.item() / 39), rel=1e-5)


def test_eval_prints_each_quantization_against_the_dtype(tiny_ckpt, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    evaluate(ckpt_dir=str(tiny_ckpt), text=str(text), dtype="float32", methods="int8", tokens=200, window=64)
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("Loaded ")]
    assert [line.split(":")[0] for line in lines] == ["float32", "int8"]
    assert lines[0].endswith("(+0.00% vs float32) on 200 tokens")
    assert all(float(line.split("perplexity ")[1].split()[0]) > 1 for line in lines)


def test_eval_command(tiny_ckpt, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    command = [sys.executable, "-m", "llama", "eval", "--ckpt_dir", str(tiny_ckpt), "--text", str(text),
               "--dtype", "float32", "--methods", "", "--tokens", "100", "--window", "50"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("float32: perplexity ")
