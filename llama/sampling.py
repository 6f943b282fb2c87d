"""Choosing the next token from logits: greedy or top-p sampling, per request, with log-probabilities."""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

# How many of the most likely tokens top-p sampling sorts first, then next, before sorting all (see sample_top_p).
NUCLEUS_GUESSES = (64, 1024)
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. temperature 0 is greedy; a `seed` gives the same tokens every time, among
    any other requests. `logprobs`: the log-probability of each generated token, with the `top_logprobs` most
    likely alternatives; `prompt_logprobs`: those of the prompt's tokens too."""

    temperature: float = 0.6
    top_p: float = 0.9
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """A random generator of its own for a seeded request; None draws from torch's global one."""
        if self.seed is None or self.temperature == 0:
            return None
        return torch.Generator(device=device).manual_seed(self.seed % 2**64)


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Next token per row of logits (bs, vocab): argmax at temperature 0, else top-p (nucleus) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1:  # the whole distribution: nothing to sort
        return torch.multinomial(probs, num_samples=1, generator=generator).reshape(-1)
    return sample_top_p(probs, top_p, generator).reshape(-1)


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probabilities add up to at least p (the nucleus:
    each token whose more likely tokens hold at most p), renormalized."""
    top_probs, top_tokens = nucleus(probs, p)
    choice = torch.multinomial(top_probs, num_samples=1, generator=generator)
    return torch.gather(top_tokens, -1, choice)


def nucleus(probs: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top-p distribution of each row of probs (bs, vocab) over its most likely tokens: (renormalized
    probabilities, zero outside the nucleus; their tokens), both (bs, count), most likely first.

    Only the most likely tokens are sorted, the first of NUCLEUS_GUESSES that holds every row's nucleus, else
    all: sorting a whole vocabulary can cost more than a decode step."""
    vocab = probs.shape[-1]
    for count in (*(min(guess, vocab) for guess in NUCLEUS_GUESSES), vocab):
        top_probs, top_tokens = torch.topk(probs, count, dim=-1)  # (bs, count), most likely first
        if count == vocab or bool((top_probs.sum(dim=-1) > p).all()):  # the next token is in no nucleus
            break
    mass_before = torch.cumsum(top_probs, dim=-1) - top_probs
    top_probs[mass_before > p] = 0.0
    return top_probs.div_(top_probs.sum(dim=-1, keepdim=True)), top_tokens


def distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The probabilities (bs, vocab) that `sample` draws each row's next token from, for temperature > 0."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1:
        return probs
    top_probs, top_tokens = nucleus(probs, top_p)
    return torch.zeros_like(probs).scatter_(-1, top_tokens, top_probs)


def logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token under logits (..., vocab), targets (...)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def top_logprobs(logits: torch.Tensor, count: int) -> List[Tuple[int, float]]:
    """The `count` most likely tokens under logits (vocab,) with their log-probabilities, most likely first."""
    values, tokens = torch.topk(torch.log_softmax(logits.float(), dim=-1), count)
    return list(zip(tokens.tolist(), values.tolist()))
