"""Generation API: streaming equals the batch result, stop strings, per-sequence stopping, input checks."""

import pytest
import torch

from llama import Llama
from llama.generation import in_prompt_order
from llama.sampling import NUCLEUS_GUESSES, sample
from llama.kernels import HalfPackedLinear, OneDNNLinear

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3,"]


@pytest.fixture(scope="module")
def generator(tiny_ckpt) -> Llama:
    return Llama.build(tiny_ckpt, max_seq_len=48, max_batch_size=4, dtype="float32")


def test_stream_equals_completion(generator):
    for stop in ([], ["e", "a"], [" the"]):
        expected = [r["generation"] for r in generator.text_completion(PROMPTS, temperature=0, max_gen_len=20, stop=stop)]
        streamed, ended = [""] * len(PROMPTS), [False] * len(PROMPTS)
        for index, text in generator.stream_text(PROMPTS, temperature=0, max_gen_len=20, stop=stop):
            assert not ended[index], "text after the end of its sequence"
            streamed[index] += text
            ended[index] = text == ""
        assert streamed == expected
        assert all(ended)


def test_in_prompt_order_runs_sequences_one_after_another():
    events = [(1, "a"), (0, "x"), (2, "p"), (1, ""), (0, "y"), (0, ""), (2, "q"), (3, ""), (2, ""), (4, "z")]
    order = list(in_prompt_order(iter(events), 5))
    assert order == [(0, "x"), (0, "y"), (0, ""), (1, "a"), (1, ""), (2, "p"), (2, "q"), (2, ""), (3, ""), (4, "z")]
    # live: the first sequence's text comes out as soon as it is produced
    stream = in_prompt_order(iter(events), 5)
    assert next(stream) == (0, "x")


def test_stop_strings_end_each_sequence_on_its_own(generator):
    full = [r["generation"] for r in generator.text_completion(PROMPTS, temperature=0, max_gen_len=20)]
    stop = full[1][3:6]  # occurs early in the second sequence only, or at least later in the others
    cut = [r["generation"] for r in generator.text_completion(PROMPTS, temperature=0, max_gen_len=20, stop=[stop])]
    assert cut == [text[: text.find(stop)] if stop in text else text for text in full]


def test_finished_sequences_leave_the_batch(generator, monkeypatch):
    segment_counts = []
    forward_batch = generator.model.forward_batch

    def recording_forward_batch(tokens, batch, logit_rows):
        segment_counts.append(len(batch.segments))
        return forward_batch(tokens, batch, logit_rows)

    monkeypatch.setattr(generator.model, "forward_batch", recording_forward_batch)
    prompt_tokens = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    assert sum(map(len, prompt_tokens)) <= generator.engine.prefill_chunk  # every prompt in the first step
    lengths = [2, 9, 5]
    alone = [generator.generate([p], n, temperature=0)[0][0] for p, n in zip(prompt_tokens, lengths)]
    segment_counts.clear()
    requests = generator._requests(prompt_tokens, 9, 0, 0.9, False, ())
    for request, n in zip(requests, lengths):
        request.sequence.max_gen_len = n
    for _ in generator._decode(requests):
        pass
    assert [r.sequence.tokens for r in requests] == alone
    steps = [len(r.sequence.tokens) + (r.sequence.stop_token is not None) for r in requests]  # tokens sampled
    assert segment_counts == [sum(n >= step for n in steps) for step in range(1, max(steps) + 1)]


def test_max_gen_len_none_fills_the_context(generator):
    prompt = generator.tokenizer.encode("Count:", bos=True, eos=False)
    tokens, _ = generator.generate([prompt], max_gen_len=generator.model.params.max_seq_len, temperature=0)
    result = generator.text_completion(["Count:"], temperature=0, max_gen_len=None)
    assert result[0]["generation"] == generator.tokenizer.decode(tokens[0])
    assert len(prompt) + len(tokens[0]) <= generator.model.params.max_seq_len


def test_logprobs_and_echo_shapes(generator):
    result = generator.text_completion(PROMPTS[:2], temperature=0, max_gen_len=6, logprobs=True, echo=True)
    for prompt, r in zip(PROMPTS, result):
        assert r["generation"].startswith("<|begin_of_text|>" + prompt)
        assert len(r["tokens"]) == len(r["logprobs"]) and r["logprobs"][0] == 0.0
        assert all(lp <= 0 for lp in r["logprobs"])
    chat = generator.chat_completion([[{"role": "user", "content": "hi"}]], max_gen_len=4, logprobs=True)
    assert len(chat[0]["tokens"]) == len(chat[0]["logprobs"]) <= 4
    assert chat[0]["generation"]["role"] == "assistant"


def test_sampling_is_seeded(tiny_ckpt):
    runs = []
    for _ in range(2):
        g = Llama.build(tiny_ckpt, max_seq_len=48, max_batch_size=4, dtype="float32", seed=7)
        runs.append(g.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=8))
    assert runs[0] == runs[1]


# nuclei within the first guess of sample_top_p, within the second, and beyond
@pytest.mark.parametrize("spread,guess", [(8.0, 0), (1.0, 1), (0.05, 2)])
def test_top_p_sampling_draws_from_transformers_nucleus(spread, guess):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    temperature, top_p, draws = 0.7, 0.9, 10000
    logits = torch.randn(1, 1500, generator=torch.Generator().manual_seed(0)) * spread
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits))
    expected = torch.softmax(warped, dim=-1)[0]
    nucleus = int((expected > 0).sum())
    assert (0, *NUCLEUS_GUESSES)[guess] < nucleus <= (*NUCLEUS_GUESSES, logits.shape[1])[guess]

    torch.manual_seed(0)
    tokens = sample(logits.expand(draws, -1), temperature, top_p)
    counts = torch.bincount(tokens, minlength=logits.shape[1]).double()
    assert counts[expected == 0].sum() == 0, "a token outside the nucleus was drawn"
    # the 20 most likely tokens one by one, then the rest of the nucleus together
    top = expected.argsort(descending=True)[:20]
    observed = torch.cat([counts[top], (draws - counts[top].sum())[None]]) / draws
    wanted = torch.cat([expected[top], (1 - expected[top].sum())[None]]).double()
    assert torch.allclose(observed, wanted, atol=5 * (0.25 / draws) ** 0.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"prompts": PROMPTS * 2}, "exceed max_batch_size 4"),
        ({"prompts": ["word " * 60]}, "leaves no room in max_seq_len 48"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"max_gen_len": 0}, "max_gen_len must be a positive integer"),
        ({"prompts": "a string"}, "prompts must be a list of strings"),
        ({"prompts": [1, 2]}, "prompts must be a list of strings"),
        ({"stop": "\n"}, "stop must be a list of strings"),
    ],
)
def test_bad_requests(generator, kwargs, match):
    kwargs = {"prompts": PROMPTS, **kwargs}
    with pytest.raises(ValueError, match=match):
        generator.text_completion(**kwargs)
    with pytest.raises(ValueError, match=match):
        list(generator.stream_text(**kwargs))


@pytest.mark.parametrize(
    "dialogs,match",
    [
        ([[]], "non-empty"),
        ([[{"role": "user", "content": None}]], "must be a str"),
        ([[{"role": "bot", "content": "hi"}]], "role 'bot'"),
        ("hello", "dialogs must be a list"),
    ],
)
def test_bad_dialogs(generator, dialogs, match):
    with pytest.raises(ValueError, match=match):
        generator.chat_completion(dialogs)


def test_bad_build_arguments(tiny_ckpt):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Llama.build(tiny_ckpt, device="cuda")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        Llama.build(tiny_ckpt, dtype="float8")
    with pytest.raises(ValueError, match="unknown device"):
        Llama.build(tiny_ckpt, device="tpu:0")
    with pytest.raises(ValueError, match="model_parallel_size 2 differs from the 1 launched"):
        Llama.build(tiny_ckpt, model_parallel_size=2)


def test_bfloat16_runs(tiny_ckpt):
    g = Llama.build(tiny_ckpt, max_seq_len=32, max_batch_size=1, dtype="bfloat16")
    output = g.model.output  # prepacked for oneDNN with AVX512-BF16, as float16 for fbgemm with AVX2, else plain
    assert g.model.tok_embeddings.weight.dtype == torch.bfloat16
    if isinstance(output, OneDNNLinear):
        assert output.blocks[0].dtype == torch.bfloat16
    elif not isinstance(output, HalfPackedLinear):
        assert output.weight.dtype == torch.bfloat16
    assert len(g.generate([[128000, 791]], 4, temperature=0)[0][0]) <= 4


def test_chat_with_tools_returns_parsed_messages(tiny_ckpt):
    generator = Llama.build(tiny_ckpt, max_seq_len=128, max_batch_size=1, dtype="float32")
    dialog = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = generator.chat_completion([dialog], temperature=0, max_gen_len=6)
    assert set(plain[0]["generation"]) == {"role", "content"}
    result = generator.chat_completion([dialog], temperature=0, max_gen_len=6, tools=["brave_search"])
    message = result[0]["generation"]
    assert set(message) == {"role", "content", "stop_reason", "tool_calls"}
    assert message["stop_reason"] in ("end_of_turn", "end_of_message", "out_of_tokens")
    streamed = "".join(text for _, text in generator.stream_chat([dialog], temperature=0, max_gen_len=6, tools=["brave_search"]))
    assert streamed == message["content"] or message["tool_calls"]


@pytest.mark.parametrize(
    "dialog,match",
    [
        ([{"role": "assistant", "content": "hi"}], r"message 0 \(assistant\) cannot start a dialog: expected system or user"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"message 1 \(user\) cannot follow a user message"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], r"message 1 \(system\) cannot follow"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "the last message must be the user's"),
        ([{"role": "user", "content": "a"}, {"role": "ipython", "content": "b"}], r"message 1 \(ipython\) cannot follow a user message"),
    ],
)
def test_dialogs_out_of_order(generator, dialog, match):
    with pytest.raises(ValueError, match=match):
        generator.chat_completion([dialog])


def test_truncate_prompt_keeps_the_most_recent_tokens(generator):
    long_prompt = " ".join(f"w{i}" for i in range(60))
    with pytest.raises(ValueError, match="truncate_prompt=True"):
        generator.text_completion([long_prompt], max_gen_len=8)
    tokens = generator.tokenizer.encode(long_prompt, bos=True, eos=False)
    truncated = generator.generate([tokens], 8, temperature=0, truncate_prompt=True)[0][0]
    kept = tokens[-(48 - 8) :]
    assert truncated == generator.generate([kept], 8, temperature=0)[0][0]
    result = generator.text_completion([long_prompt], max_gen_len=8, temperature=0, truncate_prompt=True)
    assert result[0]["generation"] == generator.tokenizer.decode(truncated)
