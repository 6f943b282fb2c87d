"""Meta checkpoint to GGUF: the demo against its published GGUF, Llama 3 round trips, Q8_0 and Q4_0 within their
error."""

import json

import gguf
import numpy as np
import pytest
import torch
from checkpoints import LLAMA31_SCALING_PARAMS
from demo_fixtures import demo_cache, demo_ckpt, demo_reader, field, hf_byte_level_bpe  # noqa: F401

from llama.checkpoint import CheckpointError, ShardedCheckpoint, read_params
from llama.gguf_export import export_gguf, gguf_name
from llama.gguf_import import convert_gguf
from llama.model import ModelArgs
from llama.tokenizer import Tokenizer

TEXTS = ["Hello, world! 12345 tokens", "  spaces\tand\nnewlines, ünïcödé, 日本語 and emoji 🦙", "x = [i**2 for i in range(10)]"]
HPARAMS = [
    "embedding_length", "block_count", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
    "rope.freq_base", "attention.layer_norm_rms_epsilon",
]  # fmt: skip


def tensors_of(reader: gguf.GGUFReader) -> dict:
    """Every tensor of a GGUF file, dequantized by gguf, in (rows, columns) order."""
    return {
        t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        .reshape([int(n) for n in reversed(t.shape)])
        for t in reader.tensors
    }


def state_of(ckpt_dir) -> dict:
    checkpoint = ShardedCheckpoint(ckpt_dir, ModelArgs(**read_params(ckpt_dir)))
    return {key: checkpoint.read(key, 0, 1, torch.float32, torch.device("cpu")) for key in checkpoint.layout}


def test_demo_export_is_the_published_gguf(demo_ckpt, demo_reader, tmp_path):
    """Exported from the demo's Meta checkpoint, the GGUF has the published file's hyperparameters, vocabulary,
    special ids and weights (as gguf dequantizes them), and its merges tokenize as the published ones do."""
    reader = gguf.GGUFReader(export_gguf(demo_ckpt, tmp_path / "demo.gguf", "f32"))
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id"]:
        assert field(reader, key) == field(demo_reader, key), key
    for key in HPARAMS:
        assert field(reader, f"llama.{key}") == pytest.approx(field(demo_reader, f"llama.{key}")), key
    ours, published = tensors_of(reader), tensors_of(demo_reader)
    assert set(ours) == set(published)  # the output projection tied to token_embd is left out, as published
    for name, tensor in published.items():
        assert torch.equal(ours[name], tensor), name
    tokens = list(field(demo_reader, "tokenizer.ggml.tokens"))
    ours_bpe = hf_byte_level_bpe(tokens, field(reader, "tokenizer.ggml.merges"), digits=True)
    published_bpe = hf_byte_level_bpe(tokens, field(demo_reader, "tokenizer.ggml.merges"), digits=True)
    for text in TEXTS:
        assert ours_bpe.encode(text).ids == published_bpe.encode(text).ids


def test_llama3_round_trip(tiny_ckpt, tmp_path, tokenizer):
    """Meta's Llama 3 tokenizer and 3.1 RoPE scaling survive GGUF and back, and every weight is exact."""
    path = export_gguf(tiny_ckpt, tmp_path / "tiny.gguf", "f32")
    reader = gguf.GGUFReader(path)
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_id
    back = convert_gguf(path, tmp_path / "back")
    params = read_params(tiny_ckpt)
    assert json.loads((back / "params.json").read_text()) == {**params, **LLAMA31_SCALING_PARAMS}
    original, returned = state_of(tiny_ckpt), state_of(back)
    for key, tensor in original.items():
        assert torch.equal(returned[key], tensor), key
    round_tripped = Tokenizer(str(back / "tokenizer.model"))
    for text in TEXTS:
        assert round_tripped.encode(text, bos=True, eos=False) == tokenizer.encode(text, bos=True, eos=False)


def assert_within_rounding(path, ckpt_dir, qtype, tolerance) -> None:
    """Every matrix of `ckpt_dir`'s GGUF export `path` is stored as `qtype`, each value within `tolerance(largest
    magnitude of its block of 32)` of the checkpoint's, and every norm as the same F32 values; a tied output
    projection is left out."""
    reader = gguf.GGUFReader(path)
    exported, types = tensors_of(reader), {t.name: t.tensor_type for t in reader.tensors}
    for key, tensor in state_of(ckpt_dir).items():
        name = gguf_name(key)
        if tensor.dim() == 1:
            assert types[name] == gguf.GGMLQuantizationType.F32 and torch.equal(exported[name], tensor)
        elif name in types or key != "output.weight":
            assert types[name] == qtype
            blocks = tensor.reshape(-1, 32)
            error = (exported[name].reshape(-1, 32) - blocks).abs()
            assert (error <= tolerance(blocks.abs().amax(-1, keepdim=True)) + 1e-7).all(), key


def test_q8_0_export_is_within_its_rounding(tiny_ckpt, tmp_path):
    # A step of max|x|/127 per 32 values, stored in fp16: half a step of error, plus up to 127 steps times the
    # step's relative rounding (2^-11).
    path = export_gguf(tiny_ckpt, tmp_path / "tiny.gguf", "q8_0")
    assert_within_rounding(path, tiny_ckpt, gguf.GGMLQuantizationType.Q8_0, lambda top: top / 127 * (0.5 + 127 * 2**-11))


def test_q4_0_export_is_within_its_rounding(small_q4_0_gguf):
    # A step of max|x|/8 per 32 values, stored in fp16: up to a step of error (the end opposite the largest
    # magnitude rounds to 8 steps, kept at 7), plus up to 8 steps times the step's relative rounding (2^-11).
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(small_q4_0_gguf).tensors}  # tied
    ckpt_dir = small_q4_0_gguf.parent / "meta"
    assert_within_rounding(small_q4_0_gguf, ckpt_dir, gguf.GGMLQuantizationType.Q4_0, lambda top: top / 8 * (1 + 8 * 2**-11))


def test_bad_requests_are_clear_errors_and_leave_nothing(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="unknown --file_type 'q4'"):
        export_gguf(tiny_ckpt, tmp_path / "x.gguf", "q4")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []
