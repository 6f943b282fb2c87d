"""Tokenizers on tiktoken BPE: Llama 3's, and any byte-level BPE a converted checkpoint describes.

A tokenizer is a `tokenizer.model` file of BPE ranks (tiktoken's format, as Meta ships it) plus a spec:
the pre-tokenizer pattern, the special tokens, BOS/EOS/pad, the stop tokens and the chat format. Llama 3's
spec is built in; a converted checkpoint stores its own as `tokenizer_spec.json` next to `tokenizer.model`.
"""

import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AbstractSet, Collection, Dict, Iterator, List, Literal, Optional, Sequence, Union

import tiktoken
from tiktoken.load import load_tiktoken_bpe

SPEC_FILE = "tokenizer_spec.json"

# Llama 3 pre-tokenizer: contractions, words with one leading non-letter, numbers of up to three
# digits, punctuation runs, newlines and other whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# Named special tokens at the start of the special range (ids 128000, 128001, ...); the rest are reserved.
LLAMA3_NAMED_SPECIAL_TOKENS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}

# Meta's cuts: text is encoded in chunks of this many characters, each cut again inside any run of more than
# MAX_RUN_CHARS consecutive whitespace or non-whitespace characters (tiktoken is slow on a huge pre-token). The
# pieces are encoded separately, so these cuts decide the ids: they are Meta's exactly.
MAX_CHUNK_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")  # re's \s is str.isspace, Meta's test


@dataclass
class TokenizerSpec:
    """Everything about a tokenizer that the BPE ranks file does not hold."""

    pattern: str  # tiktoken pre-tokenizer regex
    special_tokens: Dict[str, int]  # control tokens by text; their text in input is plain text unless allowed
    n_words: int  # the model's vocabulary size; ids at or past it are never produced
    bos_token: Optional[str]  # None: the model uses no BOS
    eos_token: str
    pad_token: str
    stop_tokens: List[str]  # generation ends at any of these
    chat_format: str = "llama3"  # see llama.chat_format.CHAT_FORMATS
    default_system_prompt: Optional[str] = None  # used by chat formats when a dialog has no system message
    extra: Dict[str, object] = field(default_factory=dict)  # format-specific settings

    @staticmethod
    def llama3(num_base_tokens: int) -> "TokenizerSpec":
        """Llama 3's spec for a ranks file of `num_base_tokens` tokens (128,000 for Meta's)."""
        names = _special_token_names(NUM_RESERVED_SPECIAL_TOKENS)
        return TokenizerSpec(
            pattern=LLAMA3_PATTERN,
            special_tokens={name: num_base_tokens + i for i, name in enumerate(names)},
            n_words=num_base_tokens + len(names),
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
            pad_token="<|finetune_right_pad_id|>",
            stop_tokens=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        )

    @staticmethod
    def load(path: Path) -> "TokenizerSpec":
        try:
            return TokenizerSpec(**json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a valid tokenizer spec ({e}): convert the checkpoint again") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1, ensure_ascii=False))


def default_tokenizer_path() -> str:
    """The Llama 3 `tokenizer.model`: `$TOKENIZER_PATH`, else the copy inside the `llama-models` package."""
    if os.environ.get("TOKENIZER_PATH"):
        return os.environ["TOKENIZER_PATH"]
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no Llama 3 tokenizer.model found: pass tokenizer_path, set TOKENIZER_PATH, or `pip install llama-models`"
        )
    return str(Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model")


def _special_token_names(num_reserved: int) -> List[str]:
    """The 256 Llama 3 special token names in id order; unnamed slots are numbered reserved tokens."""
    names, reserved = [], 0
    for i in range(num_reserved):
        if i in LLAMA3_NAMED_SPECIAL_TOKENS:
            names.append(LLAMA3_NAMED_SPECIAL_TOKENS[i])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def split_for_encoding(s: str) -> Iterator[str]:
    """Cut `s` where Meta's Tokenizer.encode does: into chunks of MAX_CHUNK_CHARS characters, and each chunk
    again every MAX_RUN_CHARS characters into any longer run of whitespace or non-whitespace (runs counted
    afresh in every chunk)."""
    for chunk_start in range(0, len(s), MAX_CHUNK_CHARS):
        chunk = s[chunk_start : chunk_start + MAX_CHUNK_CHARS]
        start = 0
        for run in _RUNS.finditer(chunk):
            begin, end = run.span()
            for cut in range(begin + MAX_RUN_CHARS, end, MAX_RUN_CHARS):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


class Tokenizer:
    """Tokenizes and detokenizes text with a BPE ranks file and its spec."""

    def __init__(self, model_path: str, spec: Optional[TokenizerSpec] = None):
        """`spec` defaults to the `tokenizer_spec.json` beside `model_path`, else to Llama 3's."""
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer file {model_path} not found: pass the path to the model's tokenizer.model")
        try:
            mergeable_ranks = load_tiktoken_bpe(model_path)
        except Exception as e:
            raise ValueError(f"{model_path} is not a tiktoken BPE file (Llama 3 tokenizer.model): {e}") from None
        if spec is None:
            spec_path = Path(model_path).with_name(SPEC_FILE)
            spec = TokenizerSpec.load(spec_path) if spec_path.is_file() else TokenizerSpec.llama3(len(mergeable_ranks))
        self.spec = spec
        self._ranks = mergeable_ranks
        self.special_tokens = dict(spec.special_tokens)
        try:
            self.model = tiktoken.Encoding(
                name=Path(model_path).name,
                pat_str=spec.pattern,
                mergeable_ranks=mergeable_ranks,
                special_tokens=self.special_tokens,
            )
        except ValueError as e:
            raise ValueError(f"{model_path} and its spec do not fit together ({e}): convert the checkpoint again") from None
        self.n_words: int = spec.n_words
        self.bos_id: Optional[int] = None if spec.bos_token is None else self.special_tokens[spec.bos_token]
        self.eos_id: int = self.special_tokens[spec.eos_token]
        self.pad_id: int = self.special_tokens[spec.pad_token]
        self.stop_tokens = {self.special_tokens[name] for name in spec.stop_tokens}

    def same_as(self, other: "Tokenizer") -> bool:
        """Whether `other` turns every text into the same tokens and back: the same ranks and spec."""
        return self.spec == other.spec and self._ranks == other._ranks

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset(),
        disallowed_special: Union[Literal["all"], Collection[str]] = (),
    ) -> List[int]:
        """Token ids of `s`, optionally framed by BOS (if the model has one) and EOS.

        Special-token text in `s` is plain text unless listed in `allowed_special`; text listed in
        `disallowed_special` raises instead.
        """
        if not isinstance(s, str):
            raise TypeError(f"can only encode str, got {type(s).__name__}")
        tokens = [self.bos_id] if bos and self.bos_id is not None else []
        for piece in split_for_encoding(s):
            tokens.extend(
                self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
            )
        if eos:
            tokens.append(self.eos_id)
        if self.n_words < self.model.n_vocab:  # bytes the model's vocabulary lacks are dropped
            tokens = [t for t in tokens if t < self.n_words]
        return tokens

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the token ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.model.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of the token ids."""
        return self.model.decode_bytes(list(ids))
