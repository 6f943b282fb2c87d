"""Building a Llama from a checkpoint directory, and batched text and chat generation."""

import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple, TypedDict, Union

import torch

from .checkpoint import CheckpointError, ShardedCheckpoint, read_params
from .model import ModelArgs, Transformer, skip_weight_init
from .parallel import init_model_parallel, pick_device, pick_dtype
from .chat_format import Dialog, Message, chat_format_for, check_dialog
from .tokenizer import Tokenizer


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
    ) -> "Llama":
        """Load a Meta checkpoint directory (params.json, consolidated.NN.pth) on this process's share of ranks.

        Works under `torchrun --nproc_per_node N` (any N the model's head counts allow, whatever the number of
        shards) and in a plain Python process. `tokenizer_path` defaults to `ckpt_dir/tokenizer.model`.
        """
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError("max_seq_len and max_batch_size must be positive integers")
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
        with torch.device("meta"), skip_weight_init():
            model = Transformer(model_args)
        model.load_state_dict(checkpoint.rank_state_dict(rank, world_size, dtype, device), assign=True, strict=True)
        model.requires_grad_(False)
        model.setup_caches(dtype, device)
        print(f"Loaded {ckpt_dir} ({checkpoint.num_shards} shard(s) on {world_size} process(es)) in {time.time() - start:.2f} s")
        return Llama(model, tokenizer)

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = chat_format_for(tokenizer)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt by up to `max_gen_len` tokens, stopping at the tokenizer's stop tokens.

        Returns the new tokens of each prompt (the prompt too with `echo`), stop token excluded, and with
        `logprobs` the log-probability of each returned token. temperature 0 decodes greedily.
        """
        params = self.model.params
        self._check_sampling(prompt_tokens, max_gen_len, temperature, top_p)
        bsz = len(prompt_tokens)
        prompt_lens = [len(t) for t in prompt_tokens]
        min_prompt_len, max_prompt_len = min(prompt_lens), max(prompt_lens)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)
        device = self.model.rope_cos.device

        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for i, prompt in enumerate(prompt_tokens):
            tokens[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
        is_prompt = torch.arange(total_len, device=device)[None, :] < torch.tensor(prompt_lens, device=device)[:, None]
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device) if logprobs else None
        stop_tokens = torch.tensor(sorted(self.tokenizer.stop_tokens), device=device)
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)

        if logprobs and min_prompt_len == total_len:
            logits = self.model.forward(tokens, 0)
            token_logprobs[:, 1:] = _logprobs_of(logits[:, :-1], tokens[:, 1:])
        prev_pos = 0
        for cur_pos in range(min_prompt_len, total_len):
            logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not logprobs)
            next_token = sample(logits[:, -1], temperature, top_p)
            # Rows still inside their prompt keep the prompt's token.
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = _logprobs_of(logits, tokens[:, prev_pos + 1 : cur_pos + 1])
            finished |= ~is_prompt[:, cur_pos] & torch.isin(next_token, stop_tokens)
            prev_pos = cur_pos
            if finished.all():
                break

        out_tokens, out_logprobs = [], []
        for i, row in enumerate(tokens.tolist()):
            start = 0 if echo else prompt_lens[i]
            end = min(prompt_lens[i] + max_gen_len, total_len)
            generated = row[prompt_lens[i] : end]
            stop = next((j for j, t in enumerate(generated) if t in self.tokenizer.stop_tokens), len(generated))
            end = prompt_lens[i] + stop
            out_tokens.append(row[start:end])
            if logprobs:
                out_logprobs.append(token_logprobs[i, start:end].tolist())
        return out_tokens, (out_logprobs if logprobs else None)

    def _check_sampling(self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float, top_p: float):
        params = self.model.params
        if not prompt_tokens or any(len(t) == 0 for t in prompt_tokens):
            raise ValueError("give at least one prompt, and no empty prompt")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size {params.max_batch_size}: "
                f"pass fewer prompts or build with a larger max_batch_size"
            )
        longest = max(len(t) for t in prompt_tokens)
        if longest >= params.max_seq_len:
            raise ValueError(
                f"a prompt of {longest} tokens leaves no room in max_seq_len {params.max_seq_len}: "
                f"shorten it or build with a larger max_seq_len"
            )
        if max_gen_len is None or max_gen_len < 1:
            raise ValueError(f"max_gen_len must be a positive integer, got {max_gen_len}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        """Complete each prompt; `max_gen_len=None` fills the rest of the context."""
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        generations, generation_logprobs = self.generate(
            prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, logprobs, echo
        )
        return [
            self._prediction(self.tokenizer.decode(t), t, generation_logprobs[i] if logprobs else None)
            for i, t in enumerate(generations)
        ]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Generate the assistant's next message for each dialog."""
        if not isinstance(dialogs, (list, tuple)):
            raise ValueError("dialogs must be a list of dialogs (lists of messages)")
        for dialog in dialogs:
            check_dialog(dialog)
        prompt_tokens = [self.formatter.encode_dialog_prompt(dialog) for dialog in dialogs]
        generations, generation_logprobs = self.generate(
            prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, logprobs
        )
        return [
            self._prediction(
                {"role": "assistant", "content": self.tokenizer.decode(t)}, t, generation_logprobs[i] if logprobs else None
            )
            for i, t in enumerate(generations)
        ]

    def _gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _prediction(self, generation, tokens: List[int], logprobs: Optional[List[float]]) -> dict:
        if logprobs is None:
            return {"generation": generation}
        return {"generation": generation, "tokens": [self.tokenizer.decode([t]) for t in tokens], "logprobs": logprobs}


def _logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token under logits (bs, seqlen, vocab)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token per row of logits (bs, vocab): argmax at temperature 0, else top-p (nucleus) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return sample_top_p(probs, top_p).reshape(-1)


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probabilities add up to at least p."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before > p] = 0.0
    sorted_probs.div_(sorted_probs.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(sorted_probs, num_samples=1)
    return torch.gather(order, -1, choice)
