"""The benchmark runs end to end on a tiny model and writes a complete report (no timing is checked); the weights
a decode step reads are counted right; a shape's checkpoint and exports are written once."""

import json
import shutil
import sys

import gguf
import pytest
import torch
from checkpoints import TINY_PARAMS
from gguf_files import DIM, FFN, HEADS, KV_HEADS, LAYERS, TOKENS, write_gguf

import llama.bench
import llama.shapes
from llama.bench import (
    METRICS, _prompts, bench, decode_weight_bytes, gguf_decode_bytes, gguf_tensor_bytes, markdown_table,
    parse_system, prepare_checkpoint, summarize,
)
from llama.command import run_cli
from llama.generation import Llama
from llama.model import ModelArgs
from llama.shapes import SHAPES, Shape

# The tiny model's values per layer: wq 64x64, wk and wv 16x64, wo 64x64, w1, w2 and w3 224x64 (or 64x224), norms 2x64.
TINY_LAYER_VALUES = 64 * 64 * 2 + 16 * 64 * 2 + 224 * 64 * 3
TINY_OUTPUT_VALUES = 128256 * 64
TINY_NORM_VALUES = 2 * 2 * 64 + 64


def test_bench_writes_a_complete_report(tiny_ckpt, tmp_path, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    systems = ["ours", "ours+int8", "transformers", "llama-models"]
    bench(
        ckpt_dir=str(tiny_ckpt), systems=",".join(systems), reps=1, prompt_len=3, new_tokens=12, prefill_len=6,
        batch=2, out=str(out), plot=str(plot),
    )
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.png"]
    report = json.loads(out.read_text())
    assert list(report["systems"]) == systems
    assert {"cpu", "cores", "torch", "transformers"} <= set(report["machine"])
    for system in report["systems"].values():
        assert len(system["reps"]) == 1
        for key in METRICS:
            stats = system["summary"][key]
            assert 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert set(report["ratios"]) == {"ours", "ours+int8", "llama-models"}
    assert set(report["ratios"]["ours+int8"]) == set(METRICS)
    args = ModelArgs(**TINY_PARAMS)
    assert report["systems"]["ours+int8"]["decode_weight_bytes"] == decode_weight_bytes(args, torch.float32, "int8")
    assert report["systems"]["transformers"]["decode_weight_bytes"] == decode_weight_bytes(args, torch.float32)
    table = markdown_table(report)
    assert table in capsys.readouterr().out
    assert "| weights read per second, decode batch 1 (GB/s) |" in table and "| weights read per decode step (GB) |" in table


def test_system_names():
    assert parse_system("ours+int8") == ("ours", "int8")
    assert parse_system("llama-models") == ("llama-models", None)
    assert parse_system("ours+compile") == ("ours", "compile")
    assert parse_system("ours+int4+compile") == ("ours", "int4+compile")
    assert parse_system("llama.cpp+q8_0") == ("llama.cpp", "q8_0")
    assert parse_system("llama.cpp+q4_0") == ("llama.cpp", "q4_0")
    bad_names = (
        "theirs", "transformers+int8", "ours+int3", "ours+int8+int4", "ours+compile+int8", "llama.cpp+int8", "ours+q8_0"
    )
    for bad in bad_names:
        with pytest.raises(ValueError, match="unknown system"):
            parse_system(bad)


def test_metrics_a_system_does_not_measure_stay_empty():
    reps = [{"decode_b1_tok_s": 10.0, "decode_batch_tok_s": None}, {"decode_b1_tok_s": 30.0, "decode_batch_tok_s": None}]
    assert summarize(reps) == {
        "decode_b1_tok_s": {"median": 20.0, "min": 10.0, "max": 30.0},
        "decode_batch_tok_s": {"median": None, "min": None, "max": None},
    }


def test_missing_packages_are_named_before_measuring(tiny_ckpt, tmp_path, monkeypatch, capsys):
    installed = llama.bench._installed
    monkeypatch.setattr(llama.bench, "_installed", lambda module: module != "llama_models" and installed(module))
    with pytest.raises(ValueError, match=r"llama-models system needs the llama_models package: pip install"):
        bench(ckpt_dir=str(tiny_ckpt), systems="ours,llama-models", reps=1, out=str(tmp_path / "b.json"))
    assert not list(tmp_path.iterdir())

    monkeypatch.setattr(llama.bench, "_installed", lambda module: module != "matplotlib" and installed(module))
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    bench(
        ckpt_dir=str(tiny_ckpt), systems="ours", reps=1, prompt_len=3, new_tokens=3, prefill_len=6, batch=2,
        out=str(out), plot=str(plot),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
    captured = capsys.readouterr()
    assert "| decode, batch 1 (tok/s) |" in captured.out
    assert captured.err.count('no plot: it needs matplotlib (pip install -e ".[bench]")') == 2


def test_every_system_gets_the_same_prompts_and_no_measurement_repeats_another():
    assert _prompts("decode", 2, 5, 100) == _prompts("decode", 2, 5, 100) != _prompts("time to first token", 2, 5, 100)


def test_weights_read_per_decode_step_are_what_the_model_holds(tiny_ckpt):
    """Every linear layer (the output projection too) and norm, not the embedding table; checked by hand and
    against the tensors of the loaded model, plain and quantized."""
    args = ModelArgs(**TINY_PARAMS)
    values = 2 * TINY_LAYER_VALUES + TINY_OUTPUT_VALUES + TINY_NORM_VALUES
    rows = 2 * (64 + 16 + 16 + 64 + 224 + 64 + 224) + 128256
    groups = 2 * (64 + 16 + 16 + 64 + 224 + 224) * 2 + 2 * 64 * 7 + 128256 * 2  # of 32 input channels
    assert decode_weight_bytes(args, torch.bfloat16) == 2 * values
    assert decode_weight_bytes(args, torch.bfloat16, "int8") == values - TINY_NORM_VALUES + 2 * rows + 2 * TINY_NORM_VALUES
    assert decode_weight_bytes(args, torch.bfloat16, "int4") == (values - TINY_NORM_VALUES) // 2 + 4 * groups + 2 * TINY_NORM_VALUES
    for quantization in (None, "int8", "int4"):
        model = Llama.build(
            tiny_ckpt, max_seq_len=8, max_batch_size=1, dtype="bfloat16", device="cpu", quantize=quantization,
            prepack=False,
        ).model
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        held = sum(t.nbytes for name, t in tensors.items() if name != "tok_embeddings.weight")
        assert decode_weight_bytes(args, torch.bfloat16, quantization) == held, quantization


def test_llama_cpp_reads_its_gguf_tensors_bytes(small_q4_0_gguf, tmp_path):
    """Q4_0: 18 bytes a block of 32 values; norms in F32; the embedding matrix counted as the tied output
    projection. The header is read as gguf reads it."""
    head_dim = DIM // HEADS
    layer = 2 * DIM * HEADS * head_dim + 2 * KV_HEADS * head_dim * DIM + 3 * DIM * FFN
    matrices = LAYERS * layer + len(TOKENS) * DIM
    assert gguf_decode_bytes(small_q4_0_gguf) == matrices // 32 * 18 + 4 * (2 * LAYERS + 1) * DIM
    for qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q4_0):
        path = write_gguf(tmp_path / f"{qtype.name}.gguf", qtype)
        assert gguf_tensor_bytes(path) == {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}


def test_a_shapes_checkpoint_and_exports_are_written_once(tmp_path, monkeypatch):
    monkeypatch.setitem(SHAPES, "tiny", Shape(TINY_PARAMS, tied=True))
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    written = []

    def export(ckpt_dir, export, path, *, dtype):
        written.append((ckpt_dir.name, export, path.name, dtype))
        path.write_text("exported")

    monkeypatch.setattr(llama.bench, "_export", export)
    shapes = tmp_path / "shapes"
    for _ in range(2):
        ckpt_dir, paths = prepare_checkpoint(None, "tiny", shapes, "bfloat16", ["hf", "q4_0"])
        assert ckpt_dir == shapes / "tiny" and paths == {"hf": shapes / "tiny-hf-bfloat16", "q4_0": shapes / "tiny-q4_0.gguf"}
        assert written == [("tiny", "hf", "tiny-hf-bfloat16", "bfloat16"), ("tiny", "q4_0", "tiny-q4_0.gguf", "bfloat16")]
        monkeypatch.setattr(llama.shapes, "write_random_checkpoint", lambda *a, **k: pytest.fail("written again"))


def test_no_room_for_a_shape_is_named_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CACHE", str(tmp_path))
    monkeypatch.setattr(llama.shapes.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 10**10))
    # 8,030,261,248 parameters in bfloat16, twice (the checkpoint and the Hugging Face export), 32 MiB spare each.
    message = (
        r"the llama3.1-8b checkpoint and its exports need 32.2 GB of disk in .*/shapes, which has 10.0 GB free: "
        r"free some space, or set LLAMA_CACHE to a folder on a larger disk$"
    )
    with pytest.raises(ValueError, match=message):
        bench(shape="llama3.1-8b", systems="ours,transformers", out=str(tmp_path / "b.json"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, error",
    [
        (["--shape", "llama3-8b"], "error: unknown --shape 'llama3-8b': use one of llama3.2-1b, llama3.2-3b, llama3.1-8b"),
        (["--shape", "llama3.2-1b", "--ckpt_dir", "x"], "error: pass --shape or --ckpt_dir, not both: --shape measures a checkpoint of its own"),
    ],
)
def test_shape_mistakes_are_one_line_errors(args, error, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["llama.bench", *args])
    with pytest.raises(SystemExit) as exit:
        run_cli(bench)
    assert exit.value.code == 1 and capsys.readouterr().err == error + "\n"
