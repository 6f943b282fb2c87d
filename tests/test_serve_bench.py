"""The serving benchmark runs our server end to end on a tiny model and writes a complete report (no timing is
checked); bad options fail before any server starts."""

import json
import math

import pytest

import llama.bench
import llama.serve_bench
from llama.cli import COMMANDS
from llama.serve_bench import bench_serve, figure_labels, markdown_table, parse_clients, percentile


def test_bench_serve_reports_every_figure(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "bench-serve.json"
    bench_serve(ckpt_dir=str(tiny_ckpt), clients="1,2", max_tokens=8, long_prompt_tokens=70,
                system_prompt_tokens=70, out=str(out))
    report = json.loads(out.read_text())
    assert list(report["systems"]) == ["ours"] and report["ratios"] == {}
    assert report["config"]["clients"] == [1, 2]
    assert {"cpu", "cores", "torch", "llama_cpp_python", "openai"} <= set(report["machine"])
    ours = report["systems"]["ours"]
    assert ours["server"][1:4] == ["-m", "llama", "serve"]
    assert len(ours["reps"]) == 1 and set(ours["reps"][0]) == set(figure_labels([1, 2]))
    for key, stats in ours["summary"].items():
        assert math.isfinite(stats["median"]) and stats["median"] > 0, key
    notes = ours["notes"]
    assert notes["stream_usage"] is True and notes["tokens_counted_from"] == "usage"
    assert notes["malformed_request_status"] == 400 and notes["metrics_status"] == 200
    assert markdown_table(report) in capsys.readouterr().out


def test_the_command_is_registered():
    assert COMMANDS["bench_serve"] is bench_serve


@pytest.mark.parametrize(
    "options, message",
    [
        ({"systems": "ours,vllm"}, r"unknown system 'vllm' in --systems: use ours or llama.cpp"),
        ({"clients": "1,two"}, r"--clients must list numbers of clients from 1 to 64, e.g. 1,2,4,8: got '1,two'"),
        ({"clients": (1, 0)}, r"--clients must list numbers of clients"),
        ({"clients": 1.5}, r"--clients must list numbers of clients"),
        ({"dtype": "float16"}, r"unknown --dtype 'float16': use float32 or bfloat16"),
        ({"max_tokens": 2}, r"--max_tokens must be 3 or more"),
        ({"reps": 0}, r"--reps must be a positive integer, got 0"),
        ({"long_prompt_tokens": 5000}, r"do not fit the servers' 4096-token context"),
    ],
)
def test_bad_options_fail_before_any_server_starts(options, message, monkeypatch):
    monkeypatch.setattr(llama.serve_bench, "running_server", lambda *a, **k: pytest.fail("a server started"))
    monkeypatch.setattr(llama.serve_bench, "demo_checkpoint_dir", lambda: pytest.fail("the demo model was needed"))
    with pytest.raises(ValueError, match=message):
        bench_serve(**options)


def test_a_missing_llama_cpp_is_named_with_its_install_command(monkeypatch):
    installed = llama.bench._installed
    monkeypatch.setattr(llama.bench, "_installed", lambda module: module != "llama_cpp" and installed(module))
    monkeypatch.setattr(llama.serve_bench, "demo_checkpoint_dir", lambda: pytest.fail("the demo model was needed"))
    with pytest.raises(ValueError, match=r"llama.cpp system needs the llama_cpp package: pip install "
                                         r"'llama-cpp-python\[server\]'"):
        bench_serve(systems="ours,llama.cpp")


def test_client_counts_and_percentiles():
    assert parse_clients("1,2,4,8") == [1, 2, 4, 8]
    assert parse_clients((1, 2)) == [1, 2] and parse_clients(4) == [4]
    assert percentile([3.0], 0.9) == 3.0
    assert percentile([float(i) for i in range(1, 11)], 0.9) == 9.0
    assert percentile([1.0, 2.0], 0.5) == 1.0
