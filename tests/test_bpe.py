"""Byte-level BPE as tiktoken ranks, against Hugging Face `tokenizers` built from the demo GGUF's vocabulary."""

import random

import pytest
import regex
import tiktoken
from demo_fixtures import demo_cache, demo_ckpt, demo_reader, field, hf_byte_level_bpe  # noqa: F401
from tiktoken.load import load_tiktoken_bpe
from tokenizers import pre_tokenizers

from llama.bpe import PRETOKENIZER_PATTERNS, byte_to_unicode, pretokenizer_pattern, ranks_from_byte_level_vocab, write_tokenizer
from llama.tokenizer import LLAMA3_PATTERN, SPEC_FILE, Tokenizer, TokenizerSpec

CONTROL = 3


def varied_text(seed: int = 0, min_chars: int = 20_000) -> str:
    """English, contractions, code, numbers, Chinese, emoji, special-token text and whitespace runs, mixed."""
    rng = random.Random(seed)
    words = (
        "the quick brown fox jumps over a lazy dog I'm you're they'll we've she'd it's DON'T WE'LL "
        "Hello World naïve café Straße résumé tokenizer byte-level merges"
    ).split()
    code = [
        "def square(x):\n    return x ** 2  # comment\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
        '{"key": [1, 2.5, null], "url": "https://example.com/a?b=c#d"}',
        "if __name__ == '__main__':\n        main()\n\n\n",
    ]
    numbers = ["3.14159", "1,000,000", "2024-06-01", "0x1F", "12345678901234567890", "v2.13", "½", "٣"]
    emoji = ["🙂", "🚀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "✅"]
    special_text = ["<|im_end|>", "<|im_start|>", "<file_sep>", "<|endoftext|>"]
    spaces = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n", "    \n    ", "\u00a0", "\u3000", " " * 9]
    parts = []
    while sum(map(len, parts)) < min_chars:
        kind = rng.randrange(7)
        if kind == 0:
            parts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + rng.choice(".,;!? "))
        elif kind == 1:
            parts.append(rng.choice(code))
        elif kind == 2:
            parts.append(rng.choice(numbers + [str(rng.randrange(10 ** rng.randint(1, 12)))]))
        elif kind == 3:
            parts.append("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 8))))
        elif kind == 4:
            parts.append("".join(rng.choice(emoji) for _ in range(rng.randint(1, 3))))
        elif kind == 5:
            parts.append(rng.choice(special_text))
        else:
            parts.append(rng.choice("()[]{}<>\"'`~!@#$%^&*-_=+|\\/:") * rng.randint(1, 4))
        parts.append(rng.choice(spaces) if rng.random() < 0.5 else "")
    return "".join(parts)


@pytest.fixture(scope="module")
def vocab(demo_reader):
    tokens = list(field(demo_reader, "tokenizer.ggml.tokens"))
    special = {i for i, kind in enumerate(field(demo_reader, "tokenizer.ggml.token_type")) if kind == CONTROL}
    return tokens, special, list(field(demo_reader, "tokenizer.ggml.merges"))


@pytest.fixture(scope="module")
def hf(vocab):
    tokens, _, merges = vocab
    return hf_byte_level_bpe(tokens, merges, digits=True)


@pytest.fixture(scope="module")
def ours(demo_ckpt):
    return Tokenizer(str(demo_ckpt / "tokenizer.model"))


def test_byte_to_unicode_is_gpt2s():
    mapping = byte_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (mapping[ord(" ")], mapping[ord("\n")], mapping[ord("A")], mapping[0], mapping[0xAD]) == ("Ġ", "Ċ", "A", "Ā", "Ń")


def test_rank_order_is_merge_order_for_every_token(vocab, hf):
    """tiktoken merging by rank = token id splits every vocabulary token as the merge list does."""
    tokens, special, _ = vocab
    ranks = ranks_from_byte_level_vocab(tokens, special)
    whole = tiktoken.Encoding("whole", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={})
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    mismatches = [
        token
        for i, token in enumerate(tokens)
        if i not in special
        and whole._encode_single_piece(bytes(to_byte[c] for c in token)) != [t.id for t in hf.model.tokenize(token)]
    ]
    assert mismatches == []


def test_missing_bytes_get_ranks_past_the_vocabulary(vocab):
    tokens, special, _ = vocab
    ranks = ranks_from_byte_level_vocab(tokens, special)
    assert all(bytes([b]) in ranks for b in range(256))
    extra = sorted(rank for rank in ranks.values() if rank >= len(tokens))
    assert extra == list(range(len(tokens), len(tokens) + 21))  # SmolLM2 lacks 21 single bytes
    assert ranks[b"\xff"] >= len(tokens) and ranks["Ġthe".replace("Ġ", " ").encode()] == tokens.index("Ġthe")
    assert not set(ranks.values()) & special


def test_matches_hf_tokenizers_on_varied_text(ours, hf):
    text = varied_text()
    assert len(text.encode()) >= 20_000
    mine, theirs = ours.encode(text, bos=False, eos=False), hf.encode(text).ids
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    assert first is None and len(mine) == len(theirs), f"first mismatch at token {first}"
    assert ours.decode(mine) == text == hf.decode(theirs, skip_special_tokens=False)


def test_bytes_outside_the_vocabulary_are_dropped_as_hf_does(ours, hf):
    text = "tab\x04 end \x1d\x1d !"
    assert ours.encode(text, bos=False, eos=False) == hf.encode(text).ids
    assert max(ours.encode(text, bos=False, eos=False)) < ours.n_words


@pytest.mark.parametrize("name,digits", [("gpt2", False), ("smollm", True)])
def test_patterns_split_like_hf_pre_tokenizers(name, digits):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf_pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if digits else byte_level
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    text = varied_text(seed=1, min_chars=5000)
    theirs = [bytes(to_byte[c] for c in piece).decode() for piece, _ in hf_pre.pre_tokenize_str(text)]
    assert regex.findall(pretokenizer_pattern(name), text) == theirs


def test_pattern_names():
    assert PRETOKENIZER_PATTERNS["llama-bpe"] == LLAMA3_PATTERN
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported.*smollm"):
        pretokenizer_pattern("qwen2")


def test_non_byte_level_token_is_an_error():
    with pytest.raises(ValueError, match="token 1 .* is not byte-level BPE text"):
        ranks_from_byte_level_vocab(["a", "a b"], special_ids=[])


def test_write_tokenizer_round_trips(tmp_path, vocab):
    tokens, special, _ = vocab
    ranks = ranks_from_byte_level_vocab(tokens, special)
    spec = TokenizerSpec(
        pattern=PRETOKENIZER_PATTERNS["smollm"], special_tokens={tokens[i]: i for i in special}, n_words=len(tokens),
        bos_token=None, eos_token="<|im_end|>", pad_token="<|im_end|>", stop_tokens=["<|im_end|>"], chat_format="chatml",
    )  # fmt: skip
    write_tokenizer(tmp_path, ranks, spec)
    assert load_tiktoken_bpe(str(tmp_path / "tokenizer.model")) == ranks
    assert TokenizerSpec.load(tmp_path / SPEC_FILE) == spec
