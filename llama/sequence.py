"""One generated sequence: its tokens, and its text released piece by piece as it becomes final."""

import bisect
import codecs
from typing import List, Optional, Sequence, Tuple

from .tokenizer import Tokenizer


class GeneratedSequence:
    """The continuation of one prompt, fed a token at a time by the decode loop.

    Text is released only once it is final: never half a UTF-8 character, and never characters that could
    still turn out to begin a stop string. The released pieces add up to exactly the finished text.
    """

    def __init__(self, prompt: List[int], tokenizer: Tokenizer, max_gen_len: int, stop: Sequence[str] = ()):
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.max_gen_len = max_gen_len
        self.stop = [s for s in stop if s]
        self.tokens: List[int] = []  # generated, without the stop token
        # log-probability of each token: the prompt's after the first (if asked for), then each generated one
        self.token_logprobs: List[float] = []
        self.top_logprobs: List[List[Tuple[int, float]]] = []  # the most likely tokens at each generated position
        self.text = ""  # released so far
        self.finish_reason: Optional[str] = None  # "stop" (stop token or string) or "length"
        self.stop_token: Optional[int] = None  # the stop token that ended the sequence, if one did
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded but not yet released
        self._text_ends: List[int] = []  # length of the decoded text after each token
        self._hold_back = max((len(s) for s in self.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def released_tokens(self) -> int:
        """How many of `tokens` the released text covers whole."""
        return bisect.bisect_right(self._text_ends, len(self.text))

    def add(self, token: int, *, context_full: bool = False) -> str:
        """Take the next generated token; return the text it releases. `context_full`: no room for more."""
        if token in self.tokenizer.stop_tokens:
            self.stop_token = token
            return self._finish("stop")
        self.tokens.append(token)
        self._held += self._decoder.decode(self.tokenizer.decode_bytes([token]))
        self._text_ends.append(len(self.text) + len(self._held))
        if self._cut_at_stop_string():
            return self._release(len(self._held))
        if len(self.tokens) >= self.max_gen_len or context_full:
            return self._finish("length")
        return self._release(len(self._held) - self._hold_back)

    def _cut_at_stop_string(self) -> bool:
        """If a stop string has appeared, drop it and everything after it, and finish."""
        hits = [i for i in (self._held.find(s) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self._held = self._held[: min(hits)]
        end = len(self.text) + len(self._held)
        # keep the tokens whose text starts before the stop string
        kept = sum(1 for start in [0, *self._text_ends[:-1]] if start < end)
        self.tokens, self._text_ends = self.tokens[:kept], self._text_ends[:kept]
        self.finish_reason = "stop"
        return True

    def _finish(self, reason: str) -> str:
        self._held += self._decoder.decode(b"", final=True)
        if not self._cut_at_stop_string():
            self.finish_reason = reason
        return self._release(len(self._held))

    def _release(self, count: int) -> str:
        if count <= 0:
            return ""
        piece, self._held = self._held[:count], self._held[count:]
        self.text += piece
        return piece
