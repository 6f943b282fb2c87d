"""Speculative decoding: cheap guesses (drafts) of a sequence's next tokens, checked by the model in one forward.

A drafter proposes up to k tokens for each decoding sequence; the engine feeds the sequence's last token and
the drafts as one segment and keeps the drafts the model agrees with, then one token of the model's own (see
`verify`). Greedy decoding keeps exactly the tokens plain decoding gives; sampling keeps the model's
distribution. Two drafters: `PromptLookup` copies what followed an earlier occurrence of the last few tokens
(free, and strong when the answer repeats its prompt, as edits do), `DraftModel` runs a small model with the
same tokenizer.
"""

from array import array
from pathlib import Path
from typing import List, NamedTuple, Optional, Protocol, Sequence, Union

import torch

from .model import RaggedBatch, Segment, Transformer
from .sampling import SamplingParams, distribution


LOOKUP = "lookup"
DRAFT_TOKENS = 8
# Prompt lookup matches the longest of the last MAX_NGRAM to MIN_NGRAM tokens found earlier in the sequence.
MAX_NGRAM = 3
MIN_NGRAM = 2


def check_speculation(speculate: Optional[Union[str, Path]], draft_tokens: int) -> None:
    """A one-line error for a `speculate` that is neither "lookup" nor a directory, or a bad draft count."""
    if speculate is not None and speculate != LOOKUP and not Path(speculate).is_dir():
        raise ValueError(f"speculate must be {LOOKUP!r} or a draft model's checkpoint directory, got {speculate!r}")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"the number of draft tokens must be a positive integer, got {draft_tokens!r}")


class Drafting(Protocol):
    """What a drafter reads of a sequence (an engine Request): its tokens so far, its cache row, its sampling."""

    tokens: List[int]
    slot: Optional[int]
    sampling: SamplingParams
    generator: Optional[torch.Generator]


class Draft(NamedTuple):
    """Proposed next tokens, and for drafts sampled from a distribution, its rows (len(tokens), vocab); None
    for drafts chosen deterministically."""

    tokens: List[int]
    probs: Optional[torch.Tensor] = None


def verify(logits: torch.Tensor, draft: Draft, sampling: SamplingParams, generator=None) -> List[int]:
    """The tokens a sequence gets from the model's logits (len(draft.tokens) + 1, vocab) at its last token and
    at each draft: the drafts it accepts, then one token of its own (a replacement for the first rejected
    draft, or the next token after them all).

    Greedy: drafts are accepted while they are the model's argmax. Sampling: draft i is accepted with
    probability min(1, p(d) / q(d)) (p the model's distribution as `sample` draws from it, q the drafter's, 1
    at the draft for deterministic drafts), and a rejected one is replaced by a draw from max(p - q, 0)
    renormalized: each token then has the model's probability exactly."""
    tokens = draft.tokens
    if sampling.temperature == 0:
        choices = logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(tokens) and choices[accepted] == tokens[accepted]:
            accepted += 1
        return choices[: accepted + 1]
    probs = distribution(logits, sampling.temperature, sampling.top_p)  # (k + 1, vocab)
    uniforms = torch.rand(len(tokens), generator=generator, device=logits.device).tolist()
    for i, token in enumerate(tokens):
        drafted = 1.0 if draft.probs is None else float(draft.probs[i, token])
        if uniforms[i] * drafted < float(probs[i, token]):
            continue
        residual = probs[i].clone()
        if draft.probs is None:
            residual[token] = 0.0
        else:
            residual = (residual - draft.probs[i]).clamp_(min=0.0)
        if not bool(residual.sum() > 0):  # p <= q everywhere: only rounding rejected the draft
            residual = probs[i]
        return tokens[:i] + [int(torch.multinomial(residual, 1, generator=generator))]
    return tokens + [int(torch.multinomial(probs[-1], 1, generator=generator))]


def prompt_lookup(
    tokens: Sequence[int], count: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM
) -> List[int]:
    """Up to `count` tokens that followed the latest earlier occurrence of the last n tokens of `tokens`, for the
    largest n from max_ngram down to min_ngram that occurs earlier; [] if none does."""
    if count < 1:
        return []
    words = array("i", tokens).tobytes()  # searched as bytes: a C search, 4 bytes a token
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        suffix, end = words[-4 * n :], len(words) - 4  # an occurrence ends before the last token
        while True:
            found = words.rfind(suffix, 0, end)
            if found < 0:
                break
            if found % 4 == 0:  # token-aligned
                start = found // 4 + n
                return list(tokens[start : start + count])
            end = found + len(suffix) - 1
    return []


class PromptLookup:
    """Drafts by prompt lookup (see prompt_lookup): nothing to run, so drafting costs next to nothing."""

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, requests: Sequence[Drafting], counts: Sequence[int]) -> List[Draft]:
        return [Draft(prompt_lookup(r.tokens, c, self.max_ngram, self.min_ngram)) for r, c in zip(requests, counts)]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


class DraftModel:
    """Drafts with a smaller model of the same tokenizer, built for the same cache rows (slots) and context: it
    decodes each sequence's drafts one token at a time, greedily or sampling as the sequence does, all
    sequences in the same forwards. Its cache keeps what it was fed while it stays a prefix of the sequence."""

    def __init__(self, model: Transformer):
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self._cached: List[List[int]] = [[] for _ in range(model.params.max_batch_size)]  # tokens per slot

    def propose(self, requests: Sequence[Drafting], counts: Sequence[int]) -> List[Draft]:
        drafts = [Draft([], [] if r.sampling.temperature else None) for r in requests]
        feeds = {}  # index of a drafting request -> tokens to feed next
        for i, (request, count) in enumerate(zip(requests, counts)):
            if count > 0:
                cached = self._cached[request.slot]
                keep = min(_common_prefix(cached, request.tokens), len(request.tokens) - 1)
                del cached[keep:]
                feeds[i] = request.tokens[keep:]
        while feeds:
            order = list(feeds)
            segments, tokens, last_rows = [], [], []
            for i in order:
                slot = requests[i].slot
                segments.append(Segment(slot, len(self._cached[slot]), len(feeds[i])))
                tokens.extend(feeds[i])
                self._cached[slot].extend(feeds[i])
                last_rows.append(len(tokens) - 1)
            batch = RaggedBatch(segments, self.model.params, self.device)
            logits = self.model.forward_batch(
                torch.tensor(tokens, device=self.device), batch, torch.tensor(last_rows, device=self.device)
            )
            for row, i in enumerate(order):
                token = self._choose(requests[i], logits[row], drafts[i])
                drafts[i].tokens.append(token)
                feeds[i] = [token]
                if len(drafts[i].tokens) == counts[i]:
                    del feeds[i]
        return [Draft(d.tokens, torch.stack(d.probs) if d.probs else None) for d in drafts]

    @staticmethod
    def _choose(request: Drafting, logits: torch.Tensor, draft: Draft) -> int:
        sampling = request.sampling
        if not sampling.temperature:
            return int(logits.argmax())
        probs = distribution(logits[None], sampling.temperature, sampling.top_p)[0]
        draft.probs.append(probs)
        return int(torch.multinomial(probs, 1, generator=request.generator))
