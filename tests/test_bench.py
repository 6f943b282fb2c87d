"""The benchmark runs end to end on a tiny model and writes a complete report (no timing is checked)."""

import json

import pytest

from llama.bench import METRICS, bench, markdown_table, parse_system, summarize


def test_bench_writes_a_complete_report(tiny_ckpt, tmp_path, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    systems = ["ours", "ours+int8", "transformers", "llama-models"]
    bench(
        ckpt_dir=str(tiny_ckpt), systems=",".join(systems), reps=1, prompt_len=3, new_tokens=3, prefill_len=6,
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
    assert markdown_table(report) in capsys.readouterr().out


def test_system_names():
    assert parse_system("ours+int8") == ("ours", "int8")
    assert parse_system("llama-models") == ("llama-models", None)
    assert parse_system("ours+compile") == ("ours", "compile")
    assert parse_system("ours+int4+compile") == ("ours", "int4+compile")
    assert parse_system("llama.cpp+q8_0") == ("llama.cpp", "q8_0")
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
    import llama.bench

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
