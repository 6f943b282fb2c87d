import dataclasses
import math

import pytest
import torch

from checkpoints import TINY_PARAMS, random_state_dict, write_checkpoint
from demo_fixtures import demo_ckpt, demo_cache  # noqa: F401 (fixtures)

from llama import Llama
from llama.engine import Engine, Request
from llama.model import ModelArgs, Transformer
from llama.optimize import optimize_for_inference
from llama.parallel import init_model_parallel
from llama.sampling import SamplingParams, distribution
from llama.speculation import Draft, DraftModel, PromptLookup, prompt_lookup, verify
from llama.tokenizer import SPEC_FILE, TokenizerSpec

GREEDY = SamplingParams(temperature=0)


def test_prompt_lookup_continues_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 2, 3, 7, 8, 5, 2, 3]
    assert prompt_lookup(tokens, 2, max_ngram=3, min_ngram=2) == [7, 8]  # latest earlier "2 3"
    assert prompt_lookup([4, 1, 2, 3, 6, 1, 9, 2, 3, 5, 1, 2, 3], 3) == [6, 1, 9]  # "1 2 3" beats "2 3"
    assert prompt_lookup([1, 2, 3, 4, 2, 9], 2, min_ngram=2) == []
    assert prompt_lookup([1, 2, 3, 4, 2, 9], 2, min_ngram=1) == []  # 9 occurs nowhere earlier
    assert prompt_lookup([1, 2, 3, 4, 2], 5, min_ngram=1) == [3, 4, 2]  # up to the end
    assert prompt_lookup([256, 1, 0, 0, 1], 3, min_ngram=1) == [0, 0, 1]  # matches are whole tokens, not bytes
    assert prompt_lookup([7, 7], 3, min_ngram=1) == [7]
    assert prompt_lookup([7], 3, min_ngram=1) == []


def test_verify_greedy_keeps_the_argmax_prefix():
    logits = torch.full((4, 10), -1.0)
    for row, token in enumerate([5, 6, 2, 9]):
        logits[row, token] = 1.0
    assert verify(logits, Draft([5, 6, 7]), GREEDY) == [5, 6, 2]
    assert verify(logits, Draft([5, 6, 2]), GREEDY) == [5, 6, 2, 9]
    assert verify(logits, Draft([1, 6, 2]), GREEDY) == [5]


def chi_square_passes(counts: torch.Tensor, probs: torch.Tensor, z: float = 3.72) -> bool:
    """Whether `counts` fit `probs` by Pearson's chi-square at about p = 1e-4 (Wilson-Hilferty's quantile);
    cells expected below 5 are pooled."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return statistic < critical


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_verify_sampling_draws_the_models_distribution(top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 12, generator=gen) * 1.5
    sampling = SamplingParams(temperature=0.9, top_p=top_p)
    target = distribution(logits[:1], sampling.temperature, top_p)[0]
    draft_probs = torch.softmax(torch.randn(1, 12, generator=gen), dim=-1)
    counts = {"lookup": torch.zeros(12), "draft model": torch.zeros(12), "always accepted": torch.zeros(12)}
    for _ in range(2500):
        counts["lookup"][verify(logits, Draft([3]), sampling, gen)[0]] += 1
        drafted = int(torch.multinomial(draft_probs[0], 1, generator=gen))
        counts["draft model"][verify(logits, Draft([drafted], draft_probs), sampling, gen)[0]] += 1
        counts["always accepted"][drafted] += 1
    assert chi_square_passes(counts["lookup"], target)
    assert chi_square_passes(counts["draft model"], target)
    assert not chi_square_passes(counts["always accepted"], target)  # the test tells a wrong rule apart


# -- a model of 16 tokens, whose distributions over two generated tokens can be counted exactly -----------------

SMALL = {**TINY_PARAMS, "dim": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 16}
PROMPT = [3, 1, 4, 15, 9, 2, 6, 5, 0, 8, 7, 10, 12, 11, 13, 14, 3, 1]  # every token, so lookup always drafts


def small_model(seed: int, max_batch_size: int = 256) -> Transformer:
    init_model_parallel(torch.device("cpu"))
    model = Transformer(ModelArgs(max_seq_len=32, max_batch_size=max_batch_size, **SMALL))
    model.load_state_dict(random_state_dict(SMALL, seed))
    model.requires_grad_(False)
    return model


def exact_pairs(model: Transformer, sampling: SamplingParams) -> torch.Tensor:
    """P(second generated token, third) after PROMPT, the first summed out: (16 * 16,)."""
    vocab = SMALL["vocab_size"]

    def next_probs(prefixes: torch.Tensor) -> torch.Tensor:
        return distribution(model.forward(prefixes, 0)[:, -1], sampling.temperature, sampling.top_p)

    prompt = torch.tensor([PROMPT])
    first = next_probs(prompt)[0]  # (16,)
    ones = prompt.repeat(vocab, 1)
    second = next_probs(torch.cat([ones, torch.arange(vocab)[:, None]], dim=1))  # (first, second)
    pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))  # (first, second) rows
    third = next_probs(torch.cat([prompt.repeat(vocab * vocab, 1), pairs], dim=1)).view(vocab, vocab, vocab)
    joint = first[:, None, None] * second[:, :, None] * third  # (first, second, third)
    return joint.sum(dim=0).flatten()


def sampled_pairs(model: Transformer, drafter, sampling: SamplingParams, tokenizer, count: int) -> torch.Tensor:
    # Chunks as long as all the slots' prompts: a whole wave of requests starts in one step.
    engine = Engine(model, drafter=drafter, draft_tokens=2, max_queue=count, prefill_chunk=len(PROMPT) * 256)
    requests = [Request(PROMPT, tokenizer, 3, sampling) for _ in range(count)]
    for request in requests:
        engine.submit(request)
    while engine.has_work():
        engine.step()
    counts = torch.zeros(SMALL["vocab_size"] ** 2)
    for request in requests:
        second, third = request.sequence.tokens[1:]
        counts[second * SMALL["vocab_size"] + third] += 1
    if drafter is not None:
        assert 0 < engine.accepted < engine.drafted  # drafts were both accepted and rejected
    return counts


@pytest.mark.parametrize("drafter_kind", ["lookup", "draft model"])
def test_speculative_sampling_keeps_the_models_distribution(tokenizer, drafter_kind):
    torch.manual_seed(0)
    model = small_model(seed=0)
    sampling = SamplingParams(temperature=1.0, top_p=0.9 if drafter_kind == "lookup" else 1.0)
    drafter = PromptLookup(max_ngram=2, min_ngram=1) if drafter_kind == "lookup" else DraftModel(small_model(seed=5))
    exact = exact_pairs(model, sampling)
    assert chi_square_passes(sampled_pairs(model, drafter, sampling, tokenizer, 1024), exact)
    if drafter_kind == "lookup":  # the exact distribution is plain sampling's
        assert chi_square_passes(sampled_pairs(model, None, sampling, tokenizer, 1024), exact)


# -- greedy decoding: the same tokens as plain decoding -------------------------------------------------------


def small_prompts(count: int):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 16, (4 + 3 * i,), generator=gen).tolist() for i in range(count)]


def run_greedy(model: Transformer, tokenizer, prompts, drafter=None, *, logprobs=False, poison=False, max_tokens=40):
    """Each prompt's greedy tokens (and log-probabilities) through an engine, all prompts together; with
    `poison`, every cache position past what its row holds is NaN after every step."""
    engine = Engine(model, drafter=drafter, draft_tokens=5)
    sampling = SamplingParams(temperature=0, logprobs=logprobs)
    requests = [Request(p, tokenizer, max_tokens, sampling) for p in prompts]
    for request in requests:
        engine.submit(request)
    while engine.has_work():
        engine.step()
        for index, slot in enumerate(engine._slots if poison else []):
            for layer in model.layers:
                layer.attention.cache_k[index, :, len(slot.tokens) :] = float("nan")
                layer.attention.cache_v[index, :, len(slot.tokens) :] = float("nan")
    results = [(r.sequence.tokens, r.sequence.token_logprobs) if logprobs else r.sequence.tokens for r in requests]
    return results, engine


@pytest.fixture(scope="module")
def small(tokenizer):
    """The 16-token model, with the products that compute each row the same in any batch (float32 CPU)."""
    model = small_model(seed=0, max_batch_size=4)
    optimize_for_inference(model)
    return model


@pytest.mark.parametrize("drafter_kind", ["lookup", "self", "other"])
def test_greedy_speculation_gives_plain_decodings_tokens(small, tokenizer, drafter_kind):
    drafter = {
        "lookup": lambda: PromptLookup(min_ngram=1),
        "self": lambda: DraftModel(small_model(seed=0, max_batch_size=4)),  # always right
        "other": lambda: DraftModel(small_model(seed=7, max_batch_size=4)),
    }[drafter_kind]()
    prompts = small_prompts(4)
    expected, _ = run_greedy(small, tokenizer, prompts)
    together, engine = run_greedy(small, tokenizer, prompts, drafter)
    assert together == expected
    assert run_greedy(small, tokenizer, prompts[1:2], drafter)[0] == expected[1:2]  # a batch of one
    assert engine.drafted > 0
    if drafter_kind == "self":
        assert engine.accepted == engine.drafted
    else:
        assert 0 < engine.accepted < engine.drafted


def test_rejected_drafts_leave_nothing_read_later(small, tokenizer):
    prompts = small_prompts(4)
    expected, _ = run_greedy(small, tokenizer, prompts)
    poisoned, engine = run_greedy(small, tokenizer, prompts, PromptLookup(min_ngram=1), poison=True)
    assert poisoned == expected
    assert 0 < engine.accepted < engine.drafted


def test_logprobs_match_plain_decoding(small, tokenizer):
    prompts = small_prompts(3)
    plain, _ = run_greedy(small, tokenizer, prompts, logprobs=True)
    speculative, engine = run_greedy(small, tokenizer, prompts, PromptLookup(min_ngram=1), logprobs=True)
    assert speculative == plain
    assert engine.accepted > 0


@pytest.mark.parametrize("speculate", ["self", "other"])
def test_build_with_a_draft_model(tiny_ckpt, speculate, tmp_path):
    draft_dir = tiny_ckpt
    if speculate == "other":
        draft_dir = write_checkpoint(tmp_path, TINY_PARAMS, random_state_dict(TINY_PARAMS, seed=1), 1, torch.float32)
    options = dict(max_seq_len=96, max_batch_size=2, dtype="float32")
    plain = Llama.build(tiny_ckpt, **options)
    generator = Llama.build(tiny_ckpt, **options, speculate=str(draft_dir), speculate_tokens=3)
    texts = ["the cat sat on the mat", "A quick brown fox"]
    assert generator.text_completion(texts, temperature=0, max_gen_len=12) == plain.text_completion(
        texts, temperature=0, max_gen_len=12
    )
    engine = generator.engine
    assert engine.drafted > 0 and (engine.accepted == engine.drafted) == (speculate == "self")


def test_demo_model_copies_text_with_few_rejections(demo_ckpt):
    """On a real model's copying task, lookup drafts are mostly right, and the text (stop strings too) is plain
    decoding's."""
    plain = Llama.build(demo_ckpt, max_seq_len=256, max_batch_size=2, dtype="float32")
    text = "The quick brown fox jumps over the lazy dog near the river bank at dawn."
    prompts = [f"Text: {text}\nThe same text again: {text}\nThe same text once more:", "The capital of France is"]
    expected = [c["generation"] for c in plain.text_completion(prompts, temperature=0, max_gen_len=16)]
    assert text[:20] in expected[0]
    generator = Llama(plain.model, plain.tokenizer, drafter=PromptLookup())
    assert [c["generation"] for c in generator.text_completion(prompts, temperature=0, max_gen_len=16)] == expected
    assert generator.engine.accepted > 0.5 * generator.engine.drafted
    stop = ["lazy"]
    cut = generator.text_completion(prompts[:1], temperature=0, max_gen_len=16, stop=stop)
    assert cut == plain.text_completion(prompts[:1], temperature=0, max_gen_len=16, stop=stop)
    assert cut[0]["generation"] == expected[0][: expected[0].index("lazy")]


def test_bad_speculation_settings_are_refused(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="'lookup' or a draft model's checkpoint directory"):
        Llama.build(tiny_ckpt, speculate="lokup")
    with pytest.raises(ValueError, match="draft tokens must be a positive integer"):
        Llama.build(tiny_ckpt, speculate="lookup", speculate_tokens=0)
    other = write_checkpoint(tmp_path / "other", TINY_PARAMS, random_state_dict(TINY_PARAMS, seed=2), 1)
    spec = TokenizerSpec.llama3(128000)
    dataclasses.replace(spec, stop_tokens=[spec.eos_token]).save(other / SPEC_FILE)
    with pytest.raises(ValueError, match="has another tokenizer than the model"):
        Llama.build(tiny_ckpt, speculate=str(other), max_seq_len=32, max_batch_size=1)
