"""Byte-level BPE vocabularies (GPT-2 style, as in GGUF and Hugging Face files) as tiktoken ranks files.

A byte-level vocabulary writes each token's bytes as printable characters (GPT-2's byte-to-unicode map).
When token ids follow the merge order, as they do in vocabularies trained by byte-level BPE, tiktoken's
"merge the adjacent pair whose result has the lowest rank" with rank = token id merges in the same order
as the merge list does.
"""

import base64
from pathlib import Path
from typing import Collection, Dict, List, Sequence, Tuple

from .tokenizer import LLAMA3_PATTERN, SPEC_FILE, TokenizerSpec

# GPT-2's byte-level pre-tokenizer (Hugging Face ByteLevel with use_regex).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# GPT-2's with every digit a piece of its own (Hugging Face Digits(individual_digits) then ByteLevel):
# whitespace before a digit stays whole because the digit split ends the piece there.
SINGLE_DIGIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"

# tiktoken patterns by llama.cpp's `tokenizer.ggml.pre` name.
PRETOKENIZER_PATTERNS: Dict[str, str] = {
    "gpt2": GPT2_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "smollm": SINGLE_DIGIT_PATTERN,
    "starcoder": SINGLE_DIGIT_PATTERN,
}


def byte_to_unicode() -> Dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters: printable Latin-1 bytes stand for themselves,
    the others (controls, space, ...) take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + len(mapping) - len(printable))
    return mapping


def byte_level_text(ranks: Dict[bytes, int], n_words: int) -> Dict[bytes, str]:
    """The byte-level text of each token of a tiktoken ranks file whose rank is below `n_words`."""
    to_text = byte_to_unicode()
    return {token: "".join(to_text[b] for b in token) for token, rank in ranks.items() if rank < n_words}


def merges_for_ranks(text: Dict[bytes, str], ranks: Dict[bytes, int]) -> List[Tuple[str, str]]:
    """Byte-level BPE merges (as in Hugging Face and GGUF files) that merge as tiktoken does with `ranks`: every
    split of every token into two tokens, ordered by the rank of the token they make."""
    merges = []
    for token in sorted(text, key=ranks.__getitem__):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        merges.extend((text[left], text[right]) for left, right in splits if left in text and right in text)
    return merges


def pretokenizer_pattern(name: str) -> str:
    """The tiktoken pattern of llama.cpp's pre-tokenizer `name`."""
    if name not in PRETOKENIZER_PATTERNS:
        raise ValueError(
            f"pre-tokenizer {name!r} is not supported: use a model whose tokenizer.ggml.pre is one of "
            f"{', '.join(PRETOKENIZER_PATTERNS)}"
        )
    return PRETOKENIZER_PATTERNS[name]


def ranks_from_byte_level_vocab(tokens: Sequence[str], special_ids: Collection[int]) -> Dict[bytes, int]:
    """tiktoken ranks of a byte-level vocabulary: token id i (unless special) gets rank i.

    Single bytes the vocabulary lacks get ranks from len(tokens) on, since tiktoken needs all 256; they lie
    past the model's vocabulary, so the Tokenizer drops them.
    """
    to_byte = {char: b for b, char in byte_to_unicode().items()}
    special = set(special_ids)
    ranks: Dict[bytes, int] = {}
    for i, token in enumerate(tokens):
        if i in special:
            continue
        try:
            raw = bytes(to_byte[char] for char in token)
        except KeyError:
            raise ValueError(
                f"token {i} ({token!r}) is not byte-level BPE text: mark it special or use a byte-level BPE tokenizer"
            ) from None
        if raw in ranks:
            raise ValueError(f"tokens {ranks[raw]} and {i} are both {token!r}: the vocabulary is corrupt")
        ranks[raw] = i
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    ranks.update({raw: len(tokens) + k for k, raw in enumerate(missing)})
    return ranks


def write_tokenizer(directory: Path, ranks: Dict[bytes, int], spec: TokenizerSpec) -> None:
    """Write `tokenizer.model` (tiktoken's base64 ranks format) and `tokenizer_spec.json` into `directory`."""
    directory = Path(directory)
    lines = [base64.b64encode(token) + b" %d\n" % rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    (directory / "tokenizer.model").write_bytes(b"".join(lines))
    spec.save(directory / SPEC_FILE)
