"""Continuous batching: one scheduler owns the model's cache rows (slots) and runs every request in shared steps.

Each step runs, in one forward (`Transformer.forward_batch`), a token of every decoding request and the next
prompt chunks of requests being prefilled: up to `prefill_chunk` prompt tokens while any request decodes, so that
a long prompt arriving delays the running streams little, and IDLE_PREFILL_CHUNKS times more otherwise. A request
takes a free slot when it arrives and gives it back when it finishes or is cancelled; requests beyond the slots
wait in a bounded queue.

Results do not depend on the other requests: each segment attends alone, the float32 CPU products compute each
row the same whatever the batch (see kernels.batch_invariant_linear), prompts are cut into chunks at fixed
positions (multiples of `prefill_chunk`, however many run in a step), and a prompt reuses a free slot's cached
prefix only in whole chunks that an earlier prompt computed the same way (prefix reuse).

With a drafter (llama.speculation), each decoding request's segment carries its last token and up to
`draft_tokens` drafts, which attend as decode steps would (`Segment.rowwise`), and the request takes the drafts
the model accepts plus one token of its own. Rejected drafts' keys and values stay in the cache beyond the
request's `fed` tokens, where nothing reads them before they are overwritten.
"""

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .model import RaggedBatch, Segment, Transformer
from .sampling import SamplingParams, logprobs_of, sample, top_logprobs
from .sequence import GeneratedSequence
from .speculation import DRAFT_TOKENS, Draft, check_speculation, verify
from .tokenizer import Tokenizer

PREFILL_CHUNK = 32
# Prompt chunks per step when no request is decoding: prefill then runs in large products.
IDLE_PREFILL_CHUNKS = 16


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


class Request:
    """One prompt to continue: its sampling, its `sequence` (tokens, text and finish reason so far) and its place in
    the engine. `on_text(request, text)` is called from the engine's thread with each new piece of text, and once
    with "" when the request has finished (its sequence says why)."""

    def __init__(
        self,
        prompt: Sequence[int],
        tokenizer: Tokenizer,
        max_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        on_text: Optional[Callable[["Request", str], None]] = None,
    ):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"the number of tokens to generate must be a positive integer, got {max_tokens}")
        self.sequence = GeneratedSequence(list(prompt), tokenizer, max_tokens, stop)
        self.sampling = sampling
        self.on_text = on_text
        self.tokens = list(prompt)  # prompt, then each generated token once sampled
        self.fed = 0  # how many of `tokens` the slot's cache holds
        self.slot: Optional[int] = None
        self.cancelled = False
        self.error: Optional[str] = None
        self.arrived = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.generator: Optional[torch.Generator] = None
        self.draft_limit: Optional[int] = None  # drafts to ask for next (speculative decoding), set by the engine

    @property
    def prompt(self) -> List[int]:
        return self.sequence.prompt

    @property
    def finished(self) -> bool:
        return self.sequence.finished or self.cancelled or self.error is not None

    def cancel(self) -> None:
        """Stop generating (from any thread): the slot is freed at the next step."""
        self.cancelled = True


@dataclass
class _Slot:
    tokens: List[int] = field(default_factory=list)  # whose keys and values the cache row holds, by position
    exact: int = 0  # how many of them whole prefill chunks computed: the prefix other prompts may reuse
    request: Optional[Request] = None
    last_used: int = 0


class _Fed(NamedTuple):
    """A segment of a step: `count` tokens of `request` fed from row `first_row` of the plan, with `draft` the
    drafts among them (None for a step without speculation)."""

    request: Request
    first_row: int
    count: int
    draft: Optional[Draft] = None


@dataclass
class StepPlan:
    """What one step feeds the model: `tokens` of `segments` end to end, and the rows whose logits it needs."""

    tokens: List[int]
    segments: List[Segment]
    logit_rows: List[int]


class Engine:
    """The scheduler: `submit` requests from any thread, and call `step` while `has_work`."""

    def __init__(
        self,
        model: Transformer,
        *,
        prefill_chunk: int = PREFILL_CHUNK,
        max_queue: Optional[int] = None,
        drafter=None,
        draft_tokens: int = DRAFT_TOKENS,
    ):
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk}")
        check_speculation(None, draft_tokens)
        self.model = model
        self.drafter = drafter  # PromptLookup, DraftModel or None: see llama.speculation
        self.draft_tokens = draft_tokens
        self.drafted = self.accepted = 0  # drafts proposed and accepted so far
        self.params = model.params
        self.prefill_chunk = prefill_chunk
        self.max_queue = max(64, model.params.max_batch_size) if max_queue is None else max_queue
        self.device = model.tok_embeddings.weight.device
        # Called with each step's plan before it runs: a server under torchrun sends it to the other ranks.
        self.before_run: Optional[Callable[[StepPlan], None]] = None
        self._slots = [_Slot() for _ in range(self.params.max_batch_size)]
        self._waiting: Deque[Request] = collections.deque()
        self._running: List[Request] = []  # in order of admission
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._stepping = threading.Lock()
        self._woken = False
        self._steps = 0

    # -- any thread -------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue `request`; raises QueueFull when the queue holds max_queue requests already."""
        if not request.prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(request.prompt) >= self.params.max_seq_len:
            raise ValueError(
                f"a prompt of {len(request.prompt)} tokens leaves no room in max_seq_len {self.params.max_seq_len}"
            )
        with self._work:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            request.generator = request.sampling.generator(self.device)
            self._waiting.append(request)
            self._work.notify()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def wait_for_work(self, timeout: float) -> bool:
        """Block until a request is queued or running, at most `timeout` seconds (or until `wake`); return whether
        one is."""
        with self._work:
            return self._work.wait_for(lambda: self.has_work() or self._woken, timeout) and self.has_work()

    def wake(self) -> None:
        """End every `wait_for_work`, now and from now on: for shutting down the thread that steps."""
        with self._work:
            self._woken = True
            self._work.notify_all()

    # -- the engine's thread ----------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one step: admit waiting requests to free slots, feed every running one, sample, release the
        finished. Returns whether there was anything to run. Steps from several threads run one at a time."""
        with self._stepping:
            return self._step()

    def _step(self) -> bool:
        with self._lock:
            self._drop_cancelled()
            self._admit()
            decoding = [r for r in self._running if r.fed >= len(r.prompt)]
        drafts = self._draft(decoding)  # outside the lock: a draft model runs forwards
        with self._lock:
            plan, rows = self._plan(drafts)
        if not plan.segments:
            return False
        try:
            if self.before_run is not None:
                self.before_run(plan)
            logits = self.run_step(plan)
        except Exception as error:  # the step's requests end with the error; the others are untouched
            for request in dict.fromkeys(fed.request for fed in rows):
                request.error = f"{type(error).__name__}: {error}"
                with self._lock:
                    self._release(request)
                self._notify(request, "")
            raise
        self._advance(plan, rows, logits)
        self._steps += 1
        return True

    def run_step(self, plan: StepPlan) -> torch.Tensor:
        """The model's logits for `plan`'s logit rows (len(logit_rows), vocab)."""
        model = self.model
        segment = plan.segments[0]
        if len(plan.segments) == 1 and segment.length == 1 and segment.slot == 0 and model.compiled_step is not None:
            token = torch.tensor([plan.tokens], device=self.device)  # a lone sequence: the compiled step
            return model.forward(token, segment.start)[0]
        batch = RaggedBatch(plan.segments, self.params, self.device)
        tokens = torch.tensor(plan.tokens, device=self.device)
        return model.forward_batch(tokens, batch, torch.tensor(plan.logit_rows, dtype=torch.long, device=self.device))

    def release_cancelled(self) -> None:
        """Free the slots of cancelled requests now rather than at the next step."""
        with self._lock:
            self._drop_cancelled()

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._notify(request, "")
        for request in [r for r in self._running if r.cancelled]:
            self._release(request)
            self._notify(request, "")

    def _admit(self) -> None:
        """Give waiting requests free slots, in order of arrival: the slot with the longest reusable prefix, else
        the one used longest ago."""
        free = [i for i, slot in enumerate(self._slots) if slot.request is None]
        while self._waiting and free:
            request = self._waiting.popleft()
            reuse = [0 if request.sampling.prompt_logprobs else self._reusable(self._slots[i], request) for i in free]
            index = max(range(len(free)), key=lambda k: (reuse[k], -self._slots[free[k]].last_used))
            slot_index = free.pop(index)
            slot = self._slots[slot_index]
            slot.request, slot.tokens, slot.exact = request, slot.tokens[: reuse[index]], reuse[index]
            request.slot, request.fed = slot_index, reuse[index]
            self._running.append(request)

    def _reusable(self, slot: _Slot, request: Request) -> int:
        """How much of `slot`'s cache `request` can start from: whole chunks of the prompt that the slot computed
        the same way, leaving at least the prompt's last token to run."""
        prompt, limit = request.prompt, min(slot.exact, len(request.prompt) - 1)
        common = 0
        while common < limit and slot.tokens[common] == prompt[common]:
            common += 1
        return common - common % self.prefill_chunk

    def _draft(self, decoding: List[Request]) -> Dict[int, Draft]:
        """The drafter's proposals for the decoding requests, by id, each as many as fit the request's
        remaining tokens and context."""
        if self.drafter is None or not decoding:
            return {}
        counts = [
            max(0, min(r.draft_limit or self.draft_tokens, r.sequence.max_gen_len - len(r.sequence.tokens) - 1,
                       self.params.max_seq_len - r.fed - 1))
            for r in decoding
        ]
        drafts = self.drafter.propose(decoding, counts)
        return {id(r): draft for r, draft in zip(decoding, drafts) if draft.tokens}

    def _plan(self, drafts: Dict[int, Draft]) -> Tuple[StepPlan, List[_Fed]]:
        """Every decoding request's next token (and its drafts), then prompt chunks in order of admission:
        prefill_chunk tokens while others decode (so their next tokens wait for little), IDLE_PREFILL_CHUNKS
        chunks when none does."""
        plan, rows = StepPlan([], [], []), []
        decoding = [r for r in self._running if r.fed >= len(r.prompt)]
        for request in decoding:
            draft = drafts.get(id(request))
            if draft is None:
                self._add_segment(plan, rows, request, request.fed, request.fed + 1)
                continue
            first_row, count = len(plan.tokens), 1 + len(draft.tokens)
            plan.tokens.extend([request.tokens[request.fed], *draft.tokens])
            plan.segments.append(Segment(request.slot, request.fed, count, rowwise=True))
            plan.logit_rows.extend(range(first_row, first_row + count))
            rows.append(_Fed(request, first_row, count, draft))
        budget = self.prefill_chunk * (1 if decoding else IDLE_PREFILL_CHUNKS)
        for request in (r for r in self._running if r.fed < len(r.prompt)):
            start = request.fed
            while start < len(request.prompt):  # chunks end at multiples of prefill_chunk
                end = min(len(request.prompt), (start // self.prefill_chunk + 1) * self.prefill_chunk)
                if end - start > budget:
                    break
                budget -= end - start
                self._add_segment(plan, rows, request, start, end)
                start = end
        return plan, rows

    @staticmethod
    def _add_segment(plan: StepPlan, rows: list, request: Request, start: int, end: int) -> None:
        """Feed request's tokens start:end, asking for the logits it needs: its next token's (at the prompt's
        end and after), and every prompt position's with prompt_logprobs."""
        first_row = len(plan.tokens)
        plan.tokens.extend(request.tokens[start:end])
        plan.segments.append(Segment(request.slot, start, end - start))
        rows.append(_Fed(request, first_row, end - start))
        if request.sampling.prompt_logprobs and start < len(request.prompt):
            plan.logit_rows.extend(range(first_row, end - start + first_row))
        elif end >= len(request.prompt):
            plan.logit_rows.append(first_row + end - start - 1)

    def _advance(self, plan: StepPlan, rows: List[_Fed], logits: torch.Tensor) -> None:
        """Record what each segment fed, sample the next token of each request that needs one, and release the
        finished."""
        logit_index = {row: i for i, row in enumerate(plan.logit_rows)}
        for request, first_row, count, draft in rows:
            slot = self._slots[request.slot]
            start = request.fed
            slot.last_used = self._steps
            if draft is not None:
                self._take_verified(request, draft, logits[logit_index[first_row] : logit_index[first_row] + count])
                continue
            request.fed += count
            slot.tokens[start:] = request.tokens[start : request.fed]
            if request.fed <= len(request.prompt) and request.fed % self.prefill_chunk == 0:
                slot.exact = request.fed  # a whole chunk of prompt
            if request.sampling.prompt_logprobs and start < len(request.prompt):
                ahead = request.tokens[start + 1 : min(request.fed + 1, len(request.prompt))]  # tokens predicted
                positions = [logit_index[first_row + i] for i in range(len(ahead))]
                request.sequence.token_logprobs.extend(
                    logprobs_of(logits[positions], torch.tensor(ahead, device=logits.device)).tolist()
                    if ahead else []
                )
            if request.fed < len(request.prompt):
                continue
            self._sample(request, logits[logit_index[first_row + count - 1]])

    def _take_verified(self, request: Request, draft: Draft, logits: torch.Tensor) -> None:
        """Give `request` the tokens the model's `logits` at its last token and drafts verify, one at a time as
        plain decoding would (its cache then holds the last token and the accepted drafts)."""
        start = request.fed
        tokens = verify(logits, draft, request.sampling, request.generator)
        accepted = len(tokens) - 1
        self.drafted += len(draft.tokens)
        self.accepted += accepted
        # Twice the drafts after a step that accepted them all, else one more than it accepted: each draft costs a
        # row, wasted when rejected, and a single draft next to nothing.
        request.draft_limit = min(self.draft_tokens, 2 * accepted if accepted == len(draft.tokens) else accepted + 1)
        for i, token in enumerate(tokens):
            request.fed = start + 1 + i
            self._slots[request.slot].tokens[start:] = request.tokens[start : request.fed]
            self._emit(request, token, logits[i])
            if request.finished:
                break

    def _sample(self, request: Request, logits: torch.Tensor) -> None:
        sampling = request.sampling
        token = int(sample(logits[None], sampling.temperature, sampling.top_p, request.generator)[0])
        self._emit(request, token, logits)

    def _emit(self, request: Request, token: int, logits: torch.Tensor) -> None:
        """Add `token`, drawn from `logits`, to `request`: its log-probabilities, its text, and its end."""
        sampling, sequence = request.sampling, request.sequence
        if sampling.logprobs or sampling.prompt_logprobs:
            sequence.token_logprobs.append(float(logprobs_of(logits, torch.tensor(token, device=logits.device))))
        if sampling.top_logprobs:
            sequence.top_logprobs.append(top_logprobs(logits, sampling.top_logprobs))
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        text = sequence.add(token, context_full=request.fed + 1 >= self.params.max_seq_len)
        request.tokens.append(token)
        if text:
            self._notify(request, text)
        if sequence.finished:
            with self._lock:
                self._release(request)
            self._notify(request, "")

    def _release(self, request: Request) -> None:
        if request in self._running:
            self._running.remove(request)
            self._slots[request.slot].request = None

    @staticmethod
    def _notify(request: Request, text: str) -> None:
        if request.on_text is not None:
            request.on_text(request, text)
