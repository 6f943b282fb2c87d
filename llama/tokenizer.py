"""Llama 3 tokenizer (tiktoken BPE) and the Llama 3 chat format."""

import importlib.util
import os
import re
from pathlib import Path
from typing import AbstractSet, Collection, Iterator, List, Literal, Optional, Sequence, TypedDict, Union

import tiktoken
from tiktoken.load import load_tiktoken_bpe

Role = Literal["system", "user", "assistant", "ipython"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Message]

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

# tiktoken can be slow or fail on a single huge pre-token, so text is encoded in pieces.
MAX_CHUNK_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")


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
    """Cut `s` into pieces tiktoken encodes quickly.

    Chunks end only before a space that follows a non-space character: no pre-token spans such a
    point, so encoding the chunks gives exactly the tokens of encoding `s` whole. Runs of more than
    MAX_RUN_CHARS whitespace or non-whitespace characters are cut into slices of that size.
    """
    start = 0
    for run in _RUNS.finditer(s):
        begin, end = run.span()
        if end - begin > MAX_RUN_CHARS:
            if begin > start:
                yield s[start:begin]
            for i in range(begin, end, MAX_RUN_CHARS):
                yield s[i : min(i + MAX_RUN_CHARS, end)]
            start = end
        elif begin - start >= MAX_CHUNK_CHARS and s[begin] == " " and begin > 0 and not s[begin - 1].isspace():
            yield s[start:begin]
            start = begin
    if start < len(s) or not s:
        yield s[start:]


class Tokenizer:
    """Tokenizes and detokenizes text with the Llama 3 tiktoken BPE model."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer file {model_path} not found: pass the path to Llama 3's tokenizer.model")
        try:
            mergeable_ranks = load_tiktoken_bpe(model_path)
        except Exception as e:
            raise ValueError(f"{model_path} is not a tiktoken BPE file (Llama 3 tokenizer.model): {e}") from None
        num_base_tokens = len(mergeable_ranks)
        self.special_tokens = {
            name: num_base_tokens + i for i, name in enumerate(_special_token_names(NUM_RESERVED_SPECIAL_TOKENS))
        }
        self.model = tiktoken.Encoding(
            name=Path(model_path).name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = self.model.n_vocab
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens = {
            self.eos_id,
            self.special_tokens["<|eom_id|>"],
            self.special_tokens["<|eot_id|>"],
        }

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset(),
        disallowed_special: Union[Literal["all"], Collection[str]] = (),
    ) -> List[int]:
        """Token ids of `s`, optionally framed by BOS/EOS.

        Special-token text in `s` is plain text unless listed in `allowed_special`; text listed in
        `disallowed_special` raises instead.
        """
        if not isinstance(s, str):
            raise TypeError(f"can only encode str, got {type(s).__name__}")
        tokens = [self.bos_id] if bos else []
        for piece in split_for_encoding(s):
            tokens.extend(
                self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
            )
        if eos:
            tokens.append(self.eos_id)
        return tokens

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the token ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.model.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of the token ids."""
        return self.model.decode_bytes(list(ids))


class ChatFormat:
    """Llama 3 dialog encoding: headers, message bodies ending in <|eot_id|>, an open assistant header."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, message: Message) -> List[int]:
        """`<|start_header_id|>role<|end_header_id|>\\n\\n`."""
        special = self.tokenizer.special_tokens
        tokens = [special["<|start_header_id|>"]]
        tokens.extend(self.tokenizer.encode(message["role"], bos=False, eos=False))
        tokens.append(special["<|end_header_id|>"])
        tokens.extend(self.tokenizer.encode("\n\n", bos=False, eos=False))
        return tokens

    def encode_message(self, message: Message) -> List[int]:
        """Header, stripped content (special-token text stays plain text) and `<|eot_id|>`."""
        tokens = self.encode_header(message)
        tokens.extend(self.tokenizer.encode(message["content"].strip(), bos=False, eos=False))
        tokens.append(self.tokenizer.special_tokens["<|eot_id|>"])
        return tokens

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """`<|begin_of_text|>`, every message, then an open assistant header for the reply."""
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            tokens.extend(self.encode_message(message))
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens


def check_dialog(dialog: Dialog) -> None:
    """Raise ValueError with what to fix unless `dialog` is a non-empty list of {role, content: str} messages."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("a dialog must be a non-empty list of {'role': ..., 'content': ...} messages")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content' keys, got {message!r}")
        if message["role"] not in ("system", "user", "assistant", "ipython"):
            raise ValueError(
                f"message {i} has role {message['role']!r}: use 'system', 'user', 'assistant' or 'ipython'"
            )
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i} content must be a str, got {type(message['content']).__name__}")
