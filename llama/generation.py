"""Building a Llama from a checkpoint directory, and batched text and chat generation."""

import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import torch

from .checkpoint import CheckpointError, ShardedCheckpoint, read_params, read_quantization
from .model import ModelArgs, Transformer
from .optimize import compile_decoding, fuse_projections, optimize_for_inference, skip_weight_init
from .pages import release_pages
from .quantized_linear import int8_layers_for_loading, quantize_model
from .parallel import init_model_parallel, pick_device, pick_dtype
from .engine import PREFILL_CHUNK, Engine, Request
from .sampling import SamplingParams
from .sequence import GeneratedSequence
from .speculation import DRAFT_TOKENS, LOOKUP, DraftModel, PromptLookup, check_speculation
from .chat_format import Dialog, Message, chat_format_for, check_dialog, check_turn_order
from .tokenizer import Tokenizer
from .tool_calls import Tool

class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class Llama:
    """A loaded model with its tokenizer and chat format."""

    @staticmethod
    def build(
        ckpt_dir: Union[str, Path],
        tokenizer_path: Optional[Union[str, Path]] = None,
        max_seq_len: int = 512,
        max_batch_size: int = 4,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        quantize: Optional[str] = None,
        prepack: bool = True,
        compile: bool = False,
        prefill_chunk: int = PREFILL_CHUNK,
        speculate: Optional[Union[str, Path]] = None,
        speculate_tokens: int = DRAFT_TOKENS,
    ) -> "Llama":
        """Load a Meta checkpoint directory (params.json, consolidated.NN.pth) on this process's share of ranks.

        Works under `torchrun --nproc_per_node N` (any N the model's head counts allow, whatever the number of
        shards) and in a plain Python process. `tokenizer_path` defaults to `ckpt_dir/tokenizer.model`.
        `quantize="int8"` or `"int4"` quantizes the linear layers' weights (see llama.quantized_linear); a
        checkpoint written quantized by `llama quantize` loads quantized by itself. Unquantized models are made
        for inference (see llama.optimize.optimize_for_inference): projections fused and, on the CPU, weights
        prepacked for a faster kernel where there is one (see PackedLinear), which rounds differently;
        `prepack=False` keeps Meta's plain layers. `compile=True` compiles the decode step with torch.compile
        (see llama.optimize.compile_decoding): faster steps after a long first one, single process only.
        Prompts run in chunks of `prefill_chunk` tokens, each step beside the other sequences' decoding (see
        llama.engine).

        `speculate` decodes speculatively (see llama.speculation), `speculate_tokens` drafts a step: "lookup"
        drafts from earlier text (prompt lookup), a checkpoint directory names a small draft model with the
        same tokenizer (a Llama 3.2 1B for a 3.1 8B), built like this one. Greedy tokens stay those of plain
        decoding (exactly in float32 on the CPU, where products do not depend on the batch; elsewhere up to
        their rounding), and sampling keeps the model's distribution.
        """
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError("max_seq_len and max_batch_size must be positive integers")
        check_speculation(speculate, speculate_tokens)
        start = time.time()
        ckpt_dir = Path(ckpt_dir)
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        params = read_params(ckpt_dir)
        rank, world_size = init_model_parallel(device, model_parallel_size)
        if rank > 0:  # only rank 0 prints
            sys.stdout = open(os.devnull, "w")
        torch.manual_seed(seed)  # identical on every rank, so every rank samples the same tokens

        tokenizer = Tokenizer(str(tokenizer_path or ckpt_dir / "tokenizer.model"))
        model_args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
        if model_args.vocab_size != tokenizer.n_words:
            raise CheckpointError(
                f"params.json has vocab_size {model_args.vocab_size} but the tokenizer has {tokenizer.n_words} "
                f"tokens: use the tokenizer.model that came with this checkpoint"
            )
        checkpoint = ShardedCheckpoint(ckpt_dir, model_args)
        if checkpoint.quantization and quantize not in (None, checkpoint.quantization):
            raise ValueError(f"{ckpt_dir} is quantized as {checkpoint.quantization}: leave quantize unset")
        with torch.device("meta"), skip_weight_init():
            model = Transformer(model_args)
        model.requires_grad_(False)
        if checkpoint.quantization:
            int8_layers_for_loading(model)
        place = (rank, world_size, dtype, device)
        quantizing = bool(quantize) and not checkpoint.quantization
        checkpoint.load_into(model, *place, linear=False if quantizing else None)
        if checkpoint.quantization:
            fuse_projections(model, release=release_pages)
        elif quantize:  # each block's linear weights read and quantized in turn, their pages released
            load = lambda module, prefix: checkpoint.load_into(module, *place, prefix, linear=True)  # noqa: E731
            quantize_model(model, quantize, release_pages, load)
        elif prepack:
            optimize_for_inference(model, release=release_pages, traceable=compile)
        model.setup_caches(dtype, device)
        if compile:
            compile_decoding(model, autotune=bool(quantize or checkpoint.quantization))
        print(f"Loaded {ckpt_dir} ({checkpoint.num_shards} shard(s) on {world_size} process(es)) in {time.time() - start:.2f} s")
        drafter = None
        if speculate == LOOKUP:
            drafter = PromptLookup()
        elif speculate is not None:  # the draft model, built alike
            draft = Llama.build(
                speculate, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                model_parallel_size=model_parallel_size, seed=seed, device=device,
                dtype=dtype, quantize=None if read_quantization(Path(speculate)) else quantize, prepack=prepack,
            )
            if not draft.tokenizer.same_as(tokenizer):
                raise ValueError(
                    f"the draft model in {speculate} has another tokenizer than the model's: draft with a model of "
                    f"the same family (the same tokenizer.model), or speculate='lookup'"
                )
            drafter = DraftModel(draft.model)
        return Llama(model, tokenizer, prefill_chunk=prefill_chunk, drafter=drafter, draft_tokens=speculate_tokens)

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        prefill_chunk: int = PREFILL_CHUNK,
        drafter=None,
        draft_tokens: int = DRAFT_TOKENS,
    ):
        """`drafter` (a llama.speculation PromptLookup or DraftModel) decodes speculatively, `draft_tokens` drafts
        a step."""
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = chat_format_for(tokenizer)
        self.engine = Engine(model, prefill_chunk=prefill_chunk, drafter=drafter, draft_tokens=draft_tokens)

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        truncate_prompt: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt by up to `max_gen_len` tokens, stopping at the tokenizer's stop tokens.

        Returns the new tokens of each prompt (the prompt too with `echo`), stop token excluded, and with
        `logprobs` the log-probability of each returned token. temperature 0 decodes greedily.
        """
        sequences = self._run(prompt_tokens, max_gen_len, temperature, top_p, logprobs, (), truncate_prompt)
        out_tokens = [(s.prompt if echo else []) + s.tokens for s in sequences]
        if not logprobs:
            return out_tokens, None
        return out_tokens, [_returned_logprobs(s, echo) for s in sequences]

    def stream(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        stop: Sequence[str] = (),
        truncate_prompt: bool = False,
    ) -> Iterator[Tuple[int, str]]:
        """Yield `(prompt index, new text)` as each sequence produces text, then `(prompt index, "")` once
        it has finished; see `text_completion` for the rest."""
        requests = self._requests(prompt_tokens, max_gen_len, temperature, top_p, False, stop, truncate_prompt)
        for events in self._decode(requests):
            yield from events

    def stream_text(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stop: Sequence[str] = (),
        truncate_prompt: bool = False,
    ) -> Iterator[Tuple[int, str]]:
        """Stream completions of `prompts` as `(prompt index, new text)` pairs."""
        prompt_tokens = self._encode_prompts(prompts)
        return self.stream(prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, stop, truncate_prompt)

    def stream_chat(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stop: Sequence[str] = (),
        tools: Optional[Sequence[Tool]] = None,
        tool_prompt_format: str = "json",
        truncate_prompt: bool = False,
    ) -> Iterator[Tuple[int, str]]:
        """Stream the assistant's next message for each dialog as `(dialog index, new text)` pairs (tool
        calls arrive as their raw text; `chat_completion` parses them)."""
        prompt_tokens = self._encode_dialogs(dialogs, tools, tool_prompt_format)
        return self.stream(prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, stop, truncate_prompt)

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        stop: Sequence[str] = (),
        truncate_prompt: bool = False,
    ) -> List[CompletionPrediction]:
        """Complete each prompt. `max_gen_len=None` fills the rest of the context; generation also ends
        at any of the `stop` strings, which are left out of the result. A prompt too long for the context is
        an error, unless `truncate_prompt` keeps its most recent tokens: as many as leave room for
        `max_gen_len` new ones, and at least half the context."""
        prompt_tokens = self._encode_prompts(prompts)
        sequences = self._run(
            prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, logprobs, stop, truncate_prompt
        )
        return [
            self._prediction((self.tokenizer.decode(s.prompt) if echo else "") + s.text, s, logprobs, echo)
            for s in sequences
        ]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        stop: Sequence[str] = (),
        tools: Optional[Sequence[Tool]] = None,
        tool_prompt_format: str = "json",
        truncate_prompt: bool = False,
    ) -> List[ChatPrediction]:
        """Generate the assistant's next message for each dialog.

        With `tools` (Llama 3.1 built-in tool names and custom tool definitions, see llama.tool_calls), the
        prompt offers them and each generation is the parsed message: `{"role": "assistant", "content",
        "stop_reason", "tool_calls"}`, content empty when the model called a tool.
        """
        prompt_tokens = self._encode_dialogs(dialogs, tools, tool_prompt_format)
        sequences = self._run(
            prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, logprobs, stop, truncate_prompt
        )
        predictions = []
        for s in sequences:
            if tools is None:
                message = {"role": "assistant", "content": s.text}
            else:
                message = self.formatter.decode_assistant_message(s.tokens + [s.stop_token] * (s.stop_token is not None))
            predictions.append(self._prediction(message, s, logprobs))
        return predictions

    def _encode_prompts(self, prompts: List[str]) -> List[List[int]]:
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        return [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]

    def _encode_dialogs(
        self, dialogs: List[Dialog], tools: Optional[Sequence[Tool]] = None, tool_prompt_format: str = "json"
    ) -> List[List[int]]:
        if not isinstance(dialogs, (list, tuple)):
            raise ValueError("dialogs must be a list of dialogs (lists of messages)")
        for dialog in dialogs:
            check_dialog(dialog)
            check_turn_order(dialog)
        return [
            self.formatter.encode_dialog_prompt(dialog, tools=tools, tool_prompt_format=tool_prompt_format)
            for dialog in dialogs
        ]

    def _gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _prediction(self, generation, sequence: GeneratedSequence, logprobs: bool, echo: bool = False) -> dict:
        if not logprobs:
            return {"generation": generation}
        tokens = (sequence.prompt if echo else []) + sequence.tokens
        return {
            "generation": generation,
            "tokens": [self.tokenizer.decode([t]) for t in tokens],
            "logprobs": _returned_logprobs(sequence, echo),
        }

    def _requests(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        stop: Sequence[str],
        truncate_prompt: bool = False,
    ) -> List[Request]:
        """Check the request and make an engine request per prompt."""
        params = self.model.params
        if not prompt_tokens or any(len(t) == 0 for t in prompt_tokens):
            raise ValueError("give at least one prompt, and no empty prompt")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size {params.max_batch_size}: "
                f"pass fewer prompts or build with a larger max_batch_size"
            )
        if not isinstance(max_gen_len, int) or max_gen_len < 1:
            raise ValueError(f"max_gen_len must be a positive integer, got {max_gen_len}")
        longest = max(len(t) for t in prompt_tokens)
        if longest >= params.max_seq_len and not truncate_prompt:
            raise ValueError(
                f"a prompt of {longest} tokens leaves no room in max_seq_len {params.max_seq_len}: shorten it, "
                f"build with a larger max_seq_len, or pass truncate_prompt=True to keep its most recent tokens"
            )
        if longest >= params.max_seq_len:
            keep = params.max_seq_len - min(max_gen_len, params.max_seq_len // 2)
            prompt_tokens = [p[-keep:] if len(p) >= params.max_seq_len else p for p in prompt_tokens]
        sampling = SamplingParams(temperature, top_p, logprobs=logprobs, prompt_logprobs=logprobs)
        if isinstance(stop, str) or not all(isinstance(s, str) for s in stop):
            raise ValueError("stop must be a list of strings")
        return [Request(p, self.tokenizer, max_gen_len, sampling, stop) for p in prompt_tokens]

    def _run(
        self, prompt_tokens, max_gen_len, temperature, top_p, logprobs=False, stop=(), truncate_prompt=False
    ) -> List[GeneratedSequence]:
        """Generate every sequence to its end without streaming."""
        requests = self._requests(prompt_tokens, max_gen_len, temperature, top_p, logprobs, stop, truncate_prompt)
        for _ in self._decode(requests):
            pass
        return [r.sequence for r in requests]

    def _decode(self, requests: List[Request]) -> Iterator[List[Tuple[int, str]]]:
        """Run `requests` through the engine: after each step, yield `(request index, new text)` for the requests
        that have some, and `(request index, "")` for those that have just finished. Requests left unfinished
        (the caller stopped reading) are cancelled."""
        events: List[Tuple[int, str]] = []
        index_of = {id(request): i for i, request in enumerate(requests)}
        for request in requests:
            request.on_text = lambda request, text: events.append((index_of[id(request)], text))
            self.engine.submit(request)
        try:
            while not all(request.finished for request in requests):
                if not self.engine.step():  # another thread (a server's) ran the step
                    time.sleep(0.001)
                if events:
                    yield list(events)
                    events.clear()
        finally:
            for request in requests:
                request.cancel()
            self.engine.release_cancelled()


def _returned_logprobs(sequence: GeneratedSequence, echo: bool) -> List[float]:
    """Log-probabilities of the returned tokens: the generated ones, after the prompt's with `echo`
    (the first prompt token has no prediction and gets 0)."""
    generated = sequence.token_logprobs[len(sequence.prompt) - 1 :][: len(sequence.tokens)]
    if not echo:
        return generated
    return [0.0, *sequence.token_logprobs[: len(sequence.prompt) - 1], *generated]


def in_prompt_order(stream: Iterable[Tuple[int, str]], count: int) -> Iterator[Tuple[int, str]]:
    """Reorder the events of `stream` (over `count` sequences) to run one sequence after another: each
    sequence's text arrives as soon as every earlier sequence has finished, live from then on."""
    pending: List[List[str]] = [[] for _ in range(count)]  # events of the sequences after the current one
    current = 0
    for index, text in stream:
        if index != current:
            pending[index].append(text)
            continue
        yield index, text
        while text == "" and current + 1 < count:  # the current sequence has finished: catch up on the next
            current += 1
            yield from ((current, piece) for piece in pending[current])
            text = pending[current][-1] if pending[current] else None
