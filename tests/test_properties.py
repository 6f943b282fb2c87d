"""Property tests: tokenizers round-trip any text, encoding never fails, generation stays within the context
and a batch decodes exactly as its prompts one by one."""

import pytest
from demo_fixtures import demo_cache, demo_ckpt  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama import Llama, Tokenizer

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ANY_TEXT = st.text(st.characters(codec="utf-8"), max_size=300)


@pytest.fixture(scope="module")
def generator(tiny_ckpt) -> Llama:
    return Llama.build(tiny_ckpt, max_seq_len=40, max_batch_size=4, dtype="float32")


@pytest.fixture(scope="module", params=["llama3", "demo"])
def any_tokenizer(request, tokenizer) -> Tokenizer:
    """Every kind of tokenizer the repo has: Llama 3's, and byte-level BPE carried over from GGUF/HF (the demo's)."""
    if request.param == "llama3":
        return tokenizer
    return Tokenizer(str(request.getfixturevalue("demo_ckpt") / "tokenizer.model"))


def representable(tokenizer: Tokenizer, text: str) -> str:
    """What a round trip gives: `text` itself, except that bytes missing from the vocabulary are dropped (none
    for Llama 3; 21 for the demo's: control characters and two 4-byte UTF-8 lead bytes, dropped as Hugging
    Face's tokenizer drops them, which leaves their continuation bytes to decode as U+FFFD)."""
    in_vocab = [tokenizer.model.encode_single_token(bytes([b])) < tokenizer.n_words for b in range(256)]
    return bytes(b for b in text.encode() if in_vocab[b]).decode(errors="replace")


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_round_trip(any_tokenizer, text):
    assert any_tokenizer.decode(any_tokenizer.encode(text, bos=False, eos=False)) == representable(any_tokenizer, text)


@settings(max_examples=8, deadline=None)
@given(chunk=st.text(st.characters(codec="utf-8"), min_size=1, max_size=64))
def test_encodes_a_megabyte(any_tokenizer, chunk):
    text = (chunk * (1_000_000 // len(chunk.encode()) + 1))[:1_000_000]
    tokens = any_tokenizer.encode(text, bos=False, eos=False)
    assert any_tokenizer.decode(tokens) == representable(any_tokenizer, text)


PROMPTS = st.lists(st.lists(st.integers(0, 127_999), min_size=1, max_size=30), min_size=1, max_size=4)


@SETTINGS
@given(prompts=PROMPTS, max_gen_len=st.integers(1, 60))
def test_generation_stays_within_max_seq_len(generator, prompts, max_gen_len):
    tokens, _ = generator.generate(prompts, max_gen_len, temperature=0)
    for prompt, generated in zip(prompts, tokens):
        assert len(generated) <= max_gen_len
        assert len(prompt) + len(generated) <= generator.model.params.max_seq_len


@SETTINGS
@given(prompts=PROMPTS, max_gen_len=st.integers(1, 12))
def test_batch_equals_one_by_one(generator, prompts, max_gen_len):
    batched, _ = generator.generate(prompts, max_gen_len, temperature=0)
    assert batched == [generator.generate([p], max_gen_len, temperature=0)[0][0] for p in prompts]
