"""The Llama 3 transformer as Meta wrote it, in fairscale model-parallel layers laid out as Meta's shards are.

Hooks for the fast paths (llama.optimize): fused projections (`wqkv`, `w13`), the CPU attention variants of
llama.kernels, and a compiled decode step (`compiled_step`).
"""

import functools
import math
from dataclasses import dataclass, fields
from typing import Callable, List, NamedTuple, Optional, Sequence

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

from . import kernels
from .pages import keep_pages_small

# Llama 3.1's RoPE scaling, the default for `use_scaled_rope`.
ROPE_SCALE_FACTOR = 8.0
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192
# Llama 3.2 1B and 3B, by (dim, n_layers): their RoPE scaling factor is 32, though their params.json says only
# `use_scaled_rope` and Meta's reference code applies 8 to every model (Meta confirmed 32 for these two).
LLAMA_3_2_SMALL_SHAPES = {(2048, 16), (3072, 28)}
LLAMA_3_2_SMALL_ROPE_SCALE_FACTOR = 32.0


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256  # the SwiGLU hidden size is a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    # Llama 3.1-style RoPE scaling, with use_scaled_rope. No factor: 32 for Llama 3.2 1B/3B's shapes, else 8.
    rope_scaling_factor: Optional[float] = None
    rope_low_freq_factor: float = ROPE_LOW_FREQ_FACTOR
    rope_high_freq_factor: float = ROPE_HIGH_FREQ_FACTOR
    rope_original_context: int = ROPE_ORIGINAL_CONTEXT
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"params.json is inconsistent: dim {self.dim} must divide by n_heads {self.n_heads}, "
                f"and n_heads by n_kv_heads {self.n_kv_heads}"
            )
        if self.use_scaled_rope and self.rope_scaling_factor is None:
            small = (self.dim, self.n_layers) in LLAMA_3_2_SMALL_SHAPES
            self.rope_scaling_factor = LLAMA_3_2_SMALL_ROPE_SCALE_FACTOR if small else ROPE_SCALE_FACTOR
        if not self.use_scaled_rope and self.rope_scaling_factor is not None:
            raise ValueError("params.json sets rope_scaling_factor without use_scaled_rope: add \"use_scaled_rope\": true")
        if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor or self.rope_original_context < 1 or (
            self.use_scaled_rope and not self.rope_scaling_factor > 0
        ):
            raise ValueError(
                f"params.json has invalid RoPE scaling (factor {self.rope_scaling_factor}, low/high frequency factors "
                f"{self.rope_low_freq_factor}/{self.rope_high_freq_factor}, original context "
                f"{self.rope_original_context}): the factor must be positive and 0 < low < high"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's SwiGLU hidden size: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def _reject_unknown_keys(init):
    known = {f.name for f in fields(ModelArgs)}

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"params.json has unknown key(s) {', '.join(unknown)}: this is not a Llama 3 checkpoint "
                f"or it needs a newer version of this repo (known keys: {', '.join(sorted(known))})"
            )
        init(self, *args, **kwargs)

    return checked_init


ModelArgs.__init__ = _reject_unknown_keys(ModelArgs.__init__)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) computed in float32, rounded to x's dtype, times the weight (as Meta's)."""
        normed = torch.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, *, scaled: bool = True) -> torch.Tensor:
    """Rotation frequency of each pair of a head's dimensions, with args' Llama 3.1-style scaling if it asks for it
    (and `scaled`): low frequencies divided by the factor, high ones kept, those between blended."""
    head_dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if not (args.use_scaled_rope and scaled):
        return freqs
    factor, low, high, context = (
        args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor, args.rope_original_context
    )
    wavelen = 2 * math.pi / freqs
    # Between the two wavelengths, blend the scaled and unscaled frequency linearly in context/wavelength.
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled_freqs = torch.where(wavelen > context / low, freqs / factor, blended)
    return torch.where(wavelen < context / high, freqs, scaled_freqs)


def rope_rotations(args: ModelArgs, length: int) -> torch.Tensor:
    """The rotation of each pair of a head's dimensions at each position, as the real and imaginary parts of unit
    complex numbers (length, head_dim // 2, 2), float32: e^(i p f) at position p for pair frequency f (the parts
    of Meta's freqs_cis)."""
    angles = torch.outer(torch.arange(length, dtype=torch.float32), rope_frequencies(args))  # (length, head_dim // 2)
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles))


def rope_factors(rotations: torch.Tensor) -> torch.Tensor:
    """`rotations` (seqlen, head_dim // 2, 2) from `rope_rotations` in the form apply_rope multiplies by, made once
    per forward for every layer: eagerly complex numbers (seqlen, 1, head_dim // 2), one complex product being
    the fastest rotation on a CPU; compiled, real parts (seqlen, 1, head_dim // 2, 2), since inductor generates
    no complex code."""
    rotations = rotations[:, None]
    return rotations if torch.compiler.is_compiling() else torch.view_as_complex(rotations)


def apply_rope(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) of x (bs, seqlen, heads, head_dim), taken as complex numbers, by `factors`
    from `rope_factors`, in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (bs, seqlen, heads, head_dim // 2, 2)
    if factors.is_complex():
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * factors)
    else:
        (real, imag), (cos, sin) = pairs.unbind(-1), factors.unbind(-1)
        rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Segment(NamedTuple):
    """Tokens continuing one cache row: `length` tokens at positions start... of row `slot`. A `rowwise` segment's
    tokens each attend as a decode step of one token would (speculative decoding's drafts, verified together,
    then get the results plain decoding gives them)."""

    slot: int
    start: int
    length: int
    rowwise: bool = False


class RaggedBatch:
    """Segments of different rows and positions laid end to end in one step (`Transformer.forward_batch`): decode
    rows of one token and prompt chunks of several, each at its own position."""

    def __init__(self, segments: Sequence[Segment], params: ModelArgs, device: torch.device):
        for segment in segments:
            if not (0 <= segment.slot < params.max_batch_size and segment.length > 0 and segment.start >= 0):
                raise ValueError(f"{segment} is not a cache row of {params.max_batch_size} with tokens")
            if segment.start + segment.length > params.max_seq_len:
                raise ValueError(f"{segment} reaches past max_seq_len {params.max_seq_len}")
        self.segments = list(segments)
        lengths = [s.length for s in self.segments]
        self.offsets = [sum(lengths[:i]) for i in range(len(lengths))]  # where each segment's tokens begin
        self.slots = torch.tensor([s.slot for s in self.segments for _ in range(s.length)], device=device)
        self.positions = torch.tensor(
            [p for s in self.segments for p in range(s.start, s.start + s.length)], device=device
        )
        # Causal over a chunk's own tokens, every cached position visible; None where Attention needs no mask.
        self.masks: List[Optional[torch.Tensor]] = [
            torch.ones(s.length, s.start + s.length, dtype=torch.bool, device=device).tril(diagonal=s.start)
            if s.length > 1 and s.start > 0 and not s.rowwise else None
            for s in self.segments
        ]


class Attention(nn.Module):
    """Grouped-query attention over this rank's heads, with a static KV cache.

    When there are more ranks than key/value heads, each rank holds one replicated key/value head.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        world = fs_init.get_model_parallel_world_size()
        if args.n_heads % world or max(args.n_kv_heads, world) % min(args.n_kv_heads, world):
            raise ValueError(
                f"{world} model-parallel ranks cannot split {args.n_heads} heads and {args.n_kv_heads} "
                f"key/value heads evenly: use a number of processes that divides n_heads and divides or "
                f"is a multiple of n_kv_heads"
            )
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // world
        self.n_local_kv_heads = max(args.n_kv_heads // world, 1)
        kv_width = max(args.n_kv_heads, world) * self.head_dim
        column = functools.partial(ColumnParallelLinear, bias=False, gather_output=False, init_method=lambda x: x)
        self.wq = column(args.dim, args.n_heads * self.head_dim)
        self.wk = column(args.dim, kv_width)
        self.wv = column(args.dim, kv_width)
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=lambda x: x
        )
        self.wqkv: Optional[nn.Module] = None  # wq, wk and wv in one, once fused (llama.optimize.fuse_projections)
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None

    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device):
        """Allocate the caches uninitialized, in small pages: only positions already written are ever read, and
        untouched pages of a large allocation take no memory."""
        shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.cache_k = torch.empty(shape, dtype=dtype, device=device)
        self.cache_v = torch.empty(shape, dtype=dtype, device=device)
        keep_pages_small(self.cache_k)
        keep_pages_small(self.cache_v)

    def _rotated_projections(self, x: torch.Tensor, rope: torch.Tensor):
        """Queries, keys and values of x (bs, seqlen, dim), queries and keys rotated by `rope`."""
        bsz, seqlen, _ = x.shape
        if self.wqkv is None:
            xqk = torch.cat([self.wq(x), self.wk(x)], dim=-1)
            xv = self.wv(x)
        else:
            kv_width = self.n_local_kv_heads * self.head_dim
            xqk, xv = self.wqkv(x).split([self.n_local_heads * self.head_dim + kv_width, kv_width], dim=-1)
        heads = [self.n_local_heads, self.n_local_kv_heads]
        xqk = apply_rope(xqk.view(bsz, seqlen, sum(heads), self.head_dim), rope)
        xq, xk = xqk.split(heads, dim=2)  # (bs, seqlen, n_local_heads | n_local_kv_heads, head_dim)
        return xq, xk, xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int,
        rope: torch.Tensor,
        mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Attention of `x` (bs, seqlen, dim) at positions start_pos... (their `rope_factors`) over the cache. `mask`
        (seqlen, positions) says which positions each new token sees; None is every position for one token, and
        causal attention from position 0 for several."""
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self._rotated_projections(x, rope)
        end_pos = start_pos + seqlen
        self.cache_k[:bsz, :, start_pos:end_pos] = xk.transpose(1, 2)
        self.cache_v[:bsz, :, start_pos:end_pos] = xv.transpose(1, 2)
        keys = self.cache_k[:bsz, :, :end_pos]  # (bs, n_local_kv_heads, cache_len + seqlen, head_dim)
        values = self.cache_v[:bsz, :, :end_pos]
        return self.wo(self._attend(xq, keys, values, start_pos, mask))

    def forward_batch(self, x: torch.Tensor, batch: RaggedBatch, rope: torch.Tensor) -> torch.Tensor:
        """Attention of the segments of `batch`, laid end to end in x (1, tokens, dim), each over its own cache
        row from its own position. Each segment attends exactly as it would alone, so its results do not depend
        on the others."""
        xq, xk, xv = self._rotated_projections(x, rope)
        self.cache_k[batch.slots, :, batch.positions] = xk[0]  # (tokens, n_local_kv_heads, head_dim)
        self.cache_v[batch.slots, :, batch.positions] = xv[0]
        outputs = []
        for segment, begin, mask in zip(batch.segments, batch.offsets, batch.masks):
            row = slice(segment.slot, segment.slot + 1)
            # A rowwise segment's tokens attend one by one, each over the positions up to its own.
            parts = [(segment.start + i, 1) for i in range(segment.length)] if segment.rowwise else [
                (segment.start, segment.length)
            ]
            for start, length in parts:
                keys, values = self.cache_k[row, :, : start + length], self.cache_v[row, :, : start + length]
                queries = xq[:, begin + start - segment.start : begin + start - segment.start + length]
                outputs.append(self._attend(queries, keys, values, start, mask))
        return self.wo(torch.cat(outputs, dim=1))

    def _attend(self, xq, keys, values, start_pos: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention of queries xq (bs, seqlen, n_local_heads, head_dim) at positions start_pos... over keys and
        values (bs, n_local_kv_heads, start_pos + seqlen, head_dim): (bs, seqlen, n_local_heads * head_dim)."""
        bsz, seqlen = xq.shape[:2]
        if seqlen == 1:
            # Decoding: the query heads sharing a key/value head become the query rows of one attention per
            # key/value head, so keys and values are never repeated (and CPU kernels stay fast for one token).
            xq = xq.view(bsz, self.n_local_kv_heads, -1, self.head_dim)  # (bs, n_local_kv_heads, groups, head_dim)
            if torch.compiler.is_compiling():
                output = kernels.decode_attention(xq, keys, values)
            else:
                output = F.scaled_dot_product_attention(xq, keys, values)
        elif kernels.attends_in_blocks(xq.dtype, xq.device):
            output = kernels.blocked_causal_attention(xq, keys, values, start_pos)
        else:  # the kernel pairs each query head with its key/value head itself, without repeating them
            xq = xq.transpose(1, 2)  # (bs, n_local_heads, seqlen, head_dim)
            output = F.scaled_dot_product_attention(
                xq, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            ).transpose(1, 2)  # (bs, seqlen, n_local_heads, head_dim)
        return output.reshape(bsz, seqlen, -1)  # (bs, seqlen, n_local_heads * head_dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=lambda x: x)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)

        self.w13: Optional[nn.Module] = None  # w1 and w3 in one, once fused (llama.optimize.fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            gate, up = self.w1(x), self.w3(x)
        else:
            gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, start_pos, rope, mask):
        h = x + self.attention(self.attention_norm(x), start_pos, rope, mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_batch(self, x, batch: RaggedBatch, rope):
        h = x + self.attention.forward_batch(self.attention_norm(x), batch, rope)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 3 decoder, used as Meta's: build, load_state_dict, forward(tokens, start_pos). The KV caches and RoPE
    tables are made on the first forward, in the weights' dtype and on their device, unless `setup_caches` made
    them first."""

    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = VocabParallelEmbedding(params.vocab_size, params.dim, init_method=lambda x: x)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=lambda x: x)
        self.rope: Optional[torch.Tensor] = None  # rope_rotations of every position
        self.compiled_step: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None

    def setup_caches(self, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate the KV caches (max_batch_size x max_seq_len) and the RoPE tables on `device`."""
        self.rope = rope_rotations(self.params, self.params.max_seq_len).to(device)
        for layer in self.layers:
            layer.attention.setup_cache(self.params.max_batch_size, self.params.max_seq_len, dtype, device)

    def output_is_tied(self) -> bool:
        """Whether the output projection's weight is the embedding matrix itself (a tied checkpoint, loaded)."""
        output, embedding = getattr(self.output, "weight", None), self.tok_embeddings.weight
        return (
            isinstance(output, torch.Tensor)
            and not output.is_meta
            and output.shape == embedding.shape
            and output.data_ptr() == embedding.data_ptr()
        )

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        """Float32 logits (bs, seqlen, vocab) for `tokens` (bs, seqlen) placed at positions start_pos...

        With `last_only`, only the last position's logits are computed: (bs, 1, vocab).
        """
        bsz, seqlen = tokens.shape
        self._make_caches()
        if start_pos + seqlen > self.params.max_seq_len:
            raise ValueError(f"positions up to {start_pos + seqlen} exceed max_seq_len {self.params.max_seq_len}")
        # A one-token prompt (position 0) stays eager: a table of length 1 would compile a graph of its own.
        if seqlen == 1 and bsz == 1 and start_pos > 0 and self.compiled_step is not None:
            tokens = tokens.clone(memory_format=torch.contiguous_format)  # strides of a slice would recompile
            rotations = self.rope[: start_pos + 1]  # its length, dynamic in the graph, gives the position
            torch._dynamo.maybe_mark_dynamic(rotations, 0)
            return self.compiled_step(tokens, rotations)
        rotations = self.rope[start_pos : start_pos + seqlen]
        mask = None  # one token sees every position; a prompt from position 0 is causal without a mask
        if seqlen > 1 and start_pos > 0:
            # Causal over the new tokens; every cached position is visible.
            mask = torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=tokens.device)
            mask = mask.tril(diagonal=start_pos)
        return self._logits(tokens, start_pos, rotations, mask, last_only)

    @torch.inference_mode()
    def forward_batch(self, tokens: torch.Tensor, batch: RaggedBatch, logit_rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits (len(logit_rows), vocab) at rows `logit_rows` of `tokens` (n,), the segments of `batch`
        laid end to end: continuous batching's step. Each segment's results are those it would get alone."""
        self._make_caches()
        h = self._embed(tokens[None])  # (1, n, dim)
        rope = rope_factors(self.rope[batch.positions])
        for layer in self.layers:
            h = layer.forward_batch(h, batch, rope)
        if len(logit_rows) == 0:  # prompt chunks that end no prompt
            return h.new_empty((0, self.params.vocab_size), dtype=torch.float32)
        return self.output(self.norm(h[0, logit_rows])).float()

    def decode_step(self, tokens: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Logits (bs, 1, vocab) for `tokens` (bs, 1) at the last position of `rotations` (the RoPE table up to
        it): the step llama.optimize.compile_decoding compiles, one graph for every position."""
        start_pos = rotations.shape[0] - 1
        return self._logits(tokens, start_pos, rotations[start_pos:], None)

    def _make_caches(self) -> None:
        if self.rope is None:  # Meta's usage: caches made on the first forward
            with torch.inference_mode(False):  # ordinary tensors, as setup_caches makes them
                self.setup_caches(self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if fs_init.get_model_parallel_world_size() == 1:
            return F.embedding(tokens, self.tok_embeddings.weight)  # without fairscale's wrappers
        return self.tok_embeddings(tokens)

    def _logits(self, tokens, start_pos, rotations, mask, last_only=False) -> torch.Tensor:
        h = self._embed(tokens)
        rope = rope_factors(rotations)
        for layer in self.layers:
            h = layer(h, start_pos, rope, mask)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

