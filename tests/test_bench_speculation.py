import pytest

from llama.bench_speculation import bench_speculation, markdown_table, worker, workload_prompts


def test_edit_prompt_holds_the_function_to_copy(tiny_ckpt, tokenizer):
    prompts = workload_prompts(str(tiny_ckpt))
    assert 400 <= len(prompts["edit"]) <= 600 and len(prompts["chat"]) < 60
    assert "durations.setdefault(endpoint, [])" in tokenizer.decode(prompts["edit"])


@pytest.mark.parametrize("system", ["ours", "ours+lookup"])
def test_worker_times_both_workloads(tiny_ckpt, system):
    spec = {"ckpt_dir": str(tiny_ckpt), "dtype": "float32", "threads": 1, "new_tokens": 6, "draft_tokens": 4,
            "max_seq_len": 700, "system": system}
    result = worker(spec)
    assert result["edit_tok_s"] > 0 and result["chat_tok_s"] > 0
    assert ("accepted" in result) == (system == "ours+lookup")
    assert 0 <= result.get("accepted", 0) <= 1


def test_table_gives_ratios_against_plain_and_llama_cpp():
    config = {"dtype": "float32", "new_tokens": 400, "draft_tokens": 8, "reps": 1, "threads": 2}
    medians = {
        "ours": {"edit_tok_s": 10.0, "chat_tok_s": 10.0},
        "ours+lookup": {"edit_tok_s": 25.0, "chat_tok_s": 9.8, "accepted": 0.75},
        "llama.cpp+lookup": {"edit_tok_s": 20.0, "chat_tok_s": 20.0},
    }
    report = {"machine": {"cpu": "CPU", "cores": 2, "torch": "2"}, "config": config,
              "systems": {s: {"median": m} for s, m in medians.items()}}
    table = markdown_table(report)
    assert "| edit | 10 | 25 | 20 | 2.50x | 1.25x |" in table
    assert "| chat | 10 | 9.8 | 20 | 0.98x | 0.49x |" in table
    assert "75% of drafts accepted" in table


@pytest.mark.parametrize("options, message", [
    ({"systems": "ours,vllm"}, "unknown system 'vllm'"),
    ({"dtype": "float16"}, "--dtype must be one of float32, bfloat16"),
    ({"new_tokens": 1}, "new_tokens >= 2"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message):
        bench_speculation(**options)
