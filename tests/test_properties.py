"""Property tests: tokenizers round-trip any text, encoding never fails, generation stays within the context
and a batch decodes exactly as its prompts one by one."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama import Llama

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ANY_TEXT = st.text(st.characters(codec="utf-8"), max_size=300)


@pytest.fixture(scope="module")
def generator(tiny_ckpt) -> Llama:
    return Llama.build(tiny_ckpt, max_seq_len=40, max_batch_size=4, dtype="float32")


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_llama3_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, bos=False, eos=False)) == text


@settings(max_examples=8, deadline=None)
@given(chunk=st.text(st.characters(codec="utf-8"), min_size=1, max_size=64))
def test_llama3_encodes_a_megabyte(tokenizer, chunk):
    text = (chunk * (1_000_000 // len(chunk.encode()) + 1))[:1_000_000]
    assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True)[1:-1]) == text


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
