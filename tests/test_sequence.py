"""Releasing generated text piece by piece: whole characters only, stop strings caught across tokens."""

from hypothesis import given, settings
from hypothesis import strategies as st

from llama.sequence import GeneratedSequence

TEXTS = st.text(st.characters(codec="utf-8"), max_size=200)


def feed(tokenizer, text, stop=(), max_gen_len=10_000):
    sequence = GeneratedSequence([tokenizer.bos_id], tokenizer, max_gen_len, stop)
    pieces = []
    for token in tokenizer.encode(text, bos=False, eos=False):
        pieces.append(sequence.add(token))
        if sequence.finished:
            break
    else:
        pieces.append(sequence.add(tokenizer.eos_id))
    return sequence, pieces


def test_multibyte_characters_are_never_split(tokenizer):
    text = "日本語のテキスト 🦙🔥👩‍👩‍👧 naïve café"
    ids = tokenizer.encode(text, bos=False, eos=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # some tokens are partial characters
    sequence, pieces = feed(tokenizer, text)
    assert "".join(pieces) == sequence.text == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert sequence.finish_reason == "stop" and sequence.tokens == ids


@settings(max_examples=150, deadline=None)
@given(text=TEXTS)
def test_stream_adds_up_to_the_decoded_text(tokenizer, text):
    sequence, pieces = feed(tokenizer, text)
    assert "".join(pieces) == sequence.text == tokenizer.decode(sequence.tokens) == text


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, data=st.data())
def test_stop_string_cuts_at_its_first_occurrence(tokenizer, text, data):
    start = data.draw(st.integers(0, len(text)))
    stop = data.draw(st.text(min_size=1, max_size=6)) if start == len(text) else text[start : start + data.draw(st.integers(1, 6))]
    sequence, pieces = feed(tokenizer, text, stop=[stop])
    expected = text[: text.find(stop)] if stop in text else text
    assert "".join(pieces) == sequence.text == expected
    assert tokenizer.decode(sequence.tokens).startswith(expected)


def test_stop_string_split_across_tokens(tokenizer):
    text = "Hello world, and goodbye"
    assert "lo wor" not in [tokenizer.decode([t]) for t in tokenizer.encode(text, bos=False, eos=False)]
    sequence, pieces = feed(tokenizer, text, stop=["lo wor"])
    assert sequence.text == "Hel" and sequence.finish_reason == "stop"
    assert tokenizer.decode(sequence.tokens) == "Hello"  # the tokens that carry text before the stop


def test_length_limit(tokenizer):
    sequence, pieces = feed(tokenizer, "one two three four five", max_gen_len=3)
    assert sequence.text == "one two three" and sequence.finish_reason == "length" and len(sequence.tokens) == 3
