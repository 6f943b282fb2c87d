"""The Llama 3 transformer, laid out in fairscale model-parallel layers exactly as Meta's shards are."""

import contextlib
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Callable, List, Optional

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from fairscale.nn.model_parallel.mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)
from torch import nn

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

    def rope_scaling(self) -> dict:
        """The RoPE scaling keys of params.json, explicit (as conversions write them); {} without scaling."""
        if not self.use_scaled_rope:
            return {}
        return {
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_low_freq_factor": self.rope_low_freq_factor,
            "rope_high_freq_factor": self.rope_high_freq_factor,
            "rope_original_context": self.rope_original_context,
        }

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

# Meta's own (multiple_of, ffn_dim_multiplier) for the published Llama 3 shapes, by (dim, hidden size).
META_FFN_PARAMS = {
    (4096, 14336): (1024, 1.3),
    (8192, 28672): (4096, 1.3),
    (16384, 53248): (4096, 1.2),
    (2048, 8192): (256, 1.5),
    (3072, 8192): (256, 1.0),
}


def ffn_params(dim: int, hidden: int) -> dict:
    """`multiple_of` and (if needed) `ffn_dim_multiplier` with which Meta's rule gives SwiGLU hidden size `hidden`.

    Meta's published shapes get Meta's own values; others the simplest that fit: no multiplier, else one
    rounded to as few decimals as possible, with the largest power-of-two multiple_of that divides `hidden`.
    """
    if dim < 2 or hidden < 1:
        raise ValueError(f"a model of dim {dim} cannot have a SwiGLU hidden size of {hidden}")
    if (dim, hidden) in META_FFN_PARAMS:
        multiple_of, multiplier = META_FFN_PARAMS[dim, hidden]
        return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    base = int(2 * (4 * dim) / 3)
    multiples = [2**k for k in range((hidden & -hidden).bit_length() - 1, -1, -1)]
    # The last candidate puts int(multiplier * base) half a unit above `hidden`, which always rounds right.
    multipliers = [None, *(round(hidden / base, digits) for digits in range(1, 6)), (hidden + 0.5) / base]
    for multiplier in multipliers:
        for multiple_of in multiples:
            params = {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
            if ModelArgs(dim=dim, n_heads=1, **params).ffn_hidden_dim == hidden:
                return params if multiplier is not None else {"multiple_of": multiple_of}
    raise AssertionError(f"no Meta FFN parameters give hidden size {hidden} for dim {dim}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) computed in float32, rounded to x's dtype, times the weight (as Meta's)."""
        normed = torch.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # one call instead of six
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
    per forward for every layer: eagerly complex numbers (seqlen, 1, head_dim // 2), one complex product being 4x
    as fast for a prompt on a CPU as the same rotation in real parts, which needs the pairs swapped or split;
    compiled, real parts (seqlen, 1, head_dim // 2, 2), which inductor fuses (it generates no complex code)."""
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


# Queries per block of blocked_causal_attention, fewer where their scores would take more bytes than this.
ATTENTION_BLOCK_ROWS = 128
ATTENTION_BLOCK_BYTES = 32 << 20


def blocked_causal_attention(
    xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start_pos: int
) -> torch.Tensor:
    """Causal attention of queries xq (bs, seqlen, n_heads, head_dim) at positions start_pos... over keys and
    values (bs, n_kv_heads, start_pos + seqlen, head_dim), as plain matrix products over blocks of queries (see
    ATTENTION_BLOCK_ROWS), each reaching only the keys its last query sees; scores and probabilities in the inputs'
    dtype, the softmax computed in float32. Returns (bs, seqlen, n_heads, head_dim). With 16-bit inputs
    on CPUs with native 16-bit products, a 512-token prompt prefills about 25% faster than through the flash
    kernel (the demo model in bfloat16, AVX512-BF16: 297 against 197 ms)."""
    bsz, seqlen, n_heads, head_dim = xq.shape
    n_kv_heads = keys.shape[1]
    groups = n_heads // n_kv_heads
    xq = (xq * head_dim**-0.5).transpose(1, 2)  # (bs, n_heads, seqlen, head_dim)
    xq = xq.reshape(bsz, n_kv_heads, groups, seqlen, head_dim)  # heads sharing a key/value head side by side
    output = torch.empty_like(xq)
    positions = torch.arange(start_pos + seqlen, device=xq.device)
    row_bytes = bsz * n_heads * len(positions) * xq.element_size()
    block_rows = max(1, min(ATTENTION_BLOCK_ROWS, ATTENTION_BLOCK_BYTES // row_bytes))
    for begin in range(0, seqlen, block_rows):
        end = min(seqlen, begin + block_rows)
        visible = start_pos + end
        rows = xq[:, :, :, begin:end].flatten(2, 3)  # (bs, n_kv_heads, groups * rows, head_dim)
        scores = torch.matmul(rows, keys[:, :, :visible].transpose(2, 3))  # (bs, n_kv_heads, groups * rows, visible)
        scores = scores.view(bsz, n_kv_heads, groups, end - begin, visible)
        first = start_pos + begin  # keys before the block's first query are visible to all of its queries
        future = positions[first:visible] > positions[first:visible, None]  # (rows, rows)
        scores[..., first:].masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1).flatten(2, 3)  # computed in float32, rounded once
        output[:, :, :, begin:end] = torch.matmul(probs, values[:, :, :visible]).view(
            bsz, n_kv_heads, groups, end - begin, head_dim
        )
    return output.view(bsz, n_heads, seqlen, head_dim).transpose(1, 2)


def decode_attention(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention of query rows xq (bs, n_kv_heads, rows, head_dim) over keys and values (bs, n_kv_heads, positions,
    head_dim), every position visible, in float32, written as products and sums for torch.compile: inductor fuses
    them into loops, up to twice as fast as the flash kernel (one compiled layer's attention over 100 to 4,000
    positions: 24-172 against 36-335 us on an AVX512 CPU). Compiled decode steps of the demo model went from
    1.12-1.24x to 1.26-1.27x eager's speed in bfloat16, and from 1.36-1.44x to 1.53-1.61x in int8. Eagerly it
    would materialize every product: eager decoding uses the flash kernel."""
    scores = (xq.float()[:, :, :, None] * keys.float()[:, :, None]).sum(-1)  # (bs, n_kv_heads, rows, positions)
    probs = torch.softmax(scores * xq.shape[-1] ** -0.5, dim=-1)
    return (probs[..., None] * values.float()[:, :, None]).sum(-2).type_as(xq)  # (bs, n_kv_heads, rows, head_dim)


def attends_in_blocks(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether prompts attend through blocked_causal_attention rather than the flash kernel: 16-bit on CPUs with
    native products (in float32, and at 16 bits where torch emulates them, the flash kernel is faster)."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not needs_upcast(dtype, device)


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
        self.wqkv: Optional[nn.Module] = None  # wq, wk and wv in one, once fused (Transformer.fuse_projections)
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
        if self.wqkv is None:
            xqk = torch.cat([self.wq(x), self.wk(x)], dim=-1)
            xv = self.wv(x)
        else:
            kv_width = self.n_local_kv_heads * self.head_dim
            xqk, xv = self.wqkv(x).split([self.n_local_heads * self.head_dim + kv_width, kv_width], dim=-1)
        heads = [self.n_local_heads, self.n_local_kv_heads]
        xqk = apply_rope(xqk.view(bsz, seqlen, sum(heads), self.head_dim), rope)
        xq, xk = xqk.split(heads, dim=2)  # (bs, seqlen, n_local_heads | n_local_kv_heads, head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)

        end_pos = start_pos + seqlen
        self.cache_k[:bsz, :, start_pos:end_pos] = xk.transpose(1, 2)
        self.cache_v[:bsz, :, start_pos:end_pos] = xv.transpose(1, 2)
        keys = self.cache_k[:bsz, :, :end_pos]  # (bs, n_local_kv_heads, cache_len + seqlen, head_dim)
        values = self.cache_v[:bsz, :, :end_pos]

        if seqlen == 1:
            # Decoding: the query heads sharing a key/value head become the query rows of one attention per
            # key/value head, so keys and values are never repeated (and CPU kernels stay fast for one token).
            xq = xq.view(bsz, self.n_local_kv_heads, -1, self.head_dim)  # (bs, n_local_kv_heads, groups, head_dim)
            if torch.compiler.is_compiling():
                output = decode_attention(xq, keys, values)
            else:
                output = F.scaled_dot_product_attention(xq, keys, values)
        elif attends_in_blocks(xq.dtype, xq.device):
            output = blocked_causal_attention(xq, keys, values, start_pos)
        else:  # the kernel pairs each query head with its key/value head itself, without repeating them
            xq = xq.transpose(1, 2)  # (bs, n_local_heads, seqlen, head_dim)
            output = F.scaled_dot_product_attention(
                xq, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            ).transpose(1, 2)  # (bs, seqlen, n_local_heads, head_dim)
        output = output.reshape(bsz, seqlen, -1)  # (bs, seqlen, n_local_heads * head_dim)
        return self.wo(output)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=lambda x: x)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)

        self.w13: Optional[nn.Module] = None  # w1 and w3 in one, once fused (Transformer.fuse_projections)

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


class RankLinear:
    """Mixin for a bias-free fairscale linear layer that computes its rank's product with `matmul(rows)` in place
    of `F.linear(rows, weight)` (see as_rank_linear). Several ranks communicate around it as fairscale's layers
    do; a single rank holding the whole layer calls `matmul` alone, as its forward."""

    matmul: Callable[[torch.Tensor], torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self, ColumnParallelLinear):
            output = self.matmul(copy_to_model_parallel_region(x))
            return gather_from_model_parallel_region(output) if self.gather_output else output
        x = x if self.input_is_parallel else scatter_to_model_parallel_region(x)
        return reduce_from_model_parallel_region(self.matmul(x))


@functools.lru_cache()
def _rank_linear_class(mixin: type, base: type, sharded: bool) -> type:
    """`base` with `mixin`'s matmul, made once per combination."""
    namespace = {"__module__": mixin.__module__}
    if not sharded:
        namespace["forward"] = mixin.matmul  # nothing to communicate: one call fewer on the hot path
    return type(mixin.__name__.removesuffix("Linear") + base.__name__, (mixin, base), namespace)


def as_rank_linear(module: nn.Module, mixin: type) -> None:
    """Make the fairscale ColumnParallelLinear or RowParallelLinear `module` one computing with `mixin`'s (a
    RankLinear's) matmul; its weights must already be what that matmul takes."""
    sharded = fs_init.get_model_parallel_world_size() > 1
    module.__class__ = _rank_linear_class(mixin, type(module), sharded)


# Weights are packed (or converted on the fly) in row blocks of at most this many bytes, so that it needs
# little extra memory.
PACK_BLOCK_BYTES = 16 << 20
# Products of at least this many rows run in float32 where the CPU lacks native bfloat16/float16 kernels.
UPCAST_MIN_ROWS = 32


@functools.lru_cache()
def needs_upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether matrix products in `dtype` on `device` lack native CPU kernels (bfloat16 without AVX512-BF16 or
    AMX, float16 without AVX512-FP16): torch then emulates them, and products of many rows, as in prefill, are
    several times faster converted to float32 (measured 4x at 512 rows on an AVX2 CPU)."""
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported()


def blockwise_linear(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """F.linear(x, weight) computed in `dtype`, converting a block of weight rows at a time (never more than
    PACK_BLOCK_BYTES converted at once), in `dtype`."""
    rows = max(1, PACK_BLOCK_BYTES // (weight.shape[1] * dtype.itemsize))
    x = x.to(dtype)
    outputs = [F.linear(x, block.to(dtype)) for block in weight.split(rows)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


# Matrix products as operators of our own, which torch.compile leaves to their kernels (see opaque_product).
_LIBRARY = torch.library.Library("llama", "FRAGMENT")


def opaque_product(name: str, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dispatch_keys) -> None:
    """Register `kernel(rows, weight)`, computing rows (..., in) times a weight of out rows, as the operator
    torch.ops.llama.<name>, for tensors of `dispatch_keys`: a compiled graph calls it as it is."""
    _LIBRARY.define(f"{name}(Tensor rows, Tensor weight) -> Tensor")
    for key in dispatch_keys:
        _LIBRARY.impl(name, kernel, key)
    torch.library.register_fake(
        f"llama::{name}", lambda rows, weight: rows.new_empty((*rows.shape[:-1], weight.shape[0])), lib=_LIBRARY
    )


def matrix_vector(row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(row, weight) for a single row through torch's own matrix-vector kernel, with oneDNN switched off
    for the call (process-wide: a product on another thread meanwhile would skip oneDNN too). For 16-bit values
    on CPUs where torch otherwise calls oneDNN, it sums in float32 as oneDNN does, at a fraction of the fixed
    cost: a bfloat16 product of 72x72 weights takes 4.5 against 15-18 us, of the demo model's layers 20-45
    against 27-53 us (prepacked for oneDNN; 3072x576 about even), on an AVX512-BF16 CPU. For more rows it is
    several times slower than oneDNN."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(row, weight)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


# Compiled decode steps call it as it is, opaque to inductor: a compiled bfloat16 step of the demo model took 9.7 ms
# with it against 10.7 ms through oneDNN's prepacked product (llama::onednn_linear below).
opaque_product("matrix_vector", matrix_vector, ("CPU",))


class DirectLinear(RankLinear):
    """Mixin for a fairscale linear layer computing F.linear directly (see RankLinear): single 16-bit rows on the
    CPU through `matrix_vector`, and in float32 products of many rows where `needs_upcast`."""

    weight: nn.Parameter

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.numel() >= UPCAST_MIN_ROWS * rows.shape[-1] and needs_upcast(rows.dtype, rows.device):
            return blockwise_linear(rows, self.weight, torch.float32).to(rows.dtype)
        if (
            rows.numel() == rows.shape[-1]
            and rows.dtype in (torch.bfloat16, torch.float16)
            and rows.device.type == "cpu"
        ):
            if torch.compiler.is_compiling():
                return torch.ops.llama.matrix_vector(rows, self.weight)
            return matrix_vector(rows, self.weight)
        return F.linear(rows, self.weight)


class PackedLinear(RankLinear):
    """Mixin for a fairscale linear layer whose weight is prepacked for a CPU kernel, in row blocks (`blocks`):
    the same products as F.linear, several times as fast where torch's plain kernels are slow. The blocks are
    opaque, so such a model is for inference only. Subclasses give the kernel (`pack_block`, `block_product`) and
    `min_batch_size(dtype)`: the smallest max_batch_size for which packing weights of `dtype` pays for itself."""

    blocks: List[Any]
    min_batch_size: Callable[[torch.dtype], int]
    traceable = True  # whether torch.compile can trace the kernel

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        """Whether the kernel computes with `weight` exactly."""
        return True

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 1:
            return self.block_product(rows, self.blocks[0])
        return torch.cat([self.block_product(rows, block) for block in self.blocks], dim=-1)


class OneDNNLinear(PackedLinear):
    """Weights prepacked for oneDNN (float32, and bfloat16 on CPUs with AVX512-BF16 or AMX): matrix-vector
    products about 1.7x (float32) to 2x (bfloat16) as fast as F.linear on AVX512 CPUs. oneDNN lays the weights
    out for products of `rows_hint` rows; its layout for single rows made float32 decoding slower, at batch 1
    too (a step 17% and a batch-8 step 35% longer on an AVX512 CPU; bfloat16 the same either way)."""

    rows_hint = 8

    @staticmethod
    def min_batch_size(dtype: torch.dtype) -> int:
        # Single 16-bit rows are faster through torch's own kernel (see matrix_vector): decode steps of the demo
        # model in bfloat16 took 11.5-11.8 against 12.3-13.0 ms (AVX512-BF16 CPU, the two builds alternating).
        return 1 if dtype == torch.float32 else 2

    @classmethod
    def pack_block(cls, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, cls.rows_hint)

    @staticmethod
    def block_product(rows: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the same product, opaque to inductor (registered below)
            return torch.ops.llama.onednn_linear(rows, block)
        return _onednn_linear(rows, block)


def _onednn_linear(rows: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, block, None, "none", [], "")


# oneDNN's product again, as an operator inductor knows nothing about. Its own lowering of mkldnn's product
# needs the packed weights frozen into the graph as constants, and a graph holding those cannot go into its
# on-disk cache (it cannot pickle them); through this operator they stay inputs of a cacheable graph.
opaque_product("onednn_linear", _onednn_linear, ("CPU", "MkldnnCPU"))  # dense rows, opaque packed block


class HalfPackedLinear(PackedLinear):
    """bfloat16 (or float16) weights held as float16 in fbgemm's packed layout, multiplied in float32 with
    AVX2 and F16C, for CPUs without native bfloat16 products: on an AVX2 CPU about as fast as torch's emulated
    bfloat16 for one row, 2-3.6x as fast for 8 rows and 4-8x for hundreds. A bfloat16 weight converts to
    float16 exactly unless its magnitude is below float16's normal range (6.1e-5, where a tiny rounding remains:
    below 3e-8); `fits` rejects weights above its largest value. fbgemm pads the input width to a multiple of
    512. Packing takes about 10 ns per weight on 2 cores and gains nothing for single rows, so models built for
    one sequence at a time keep torch's kernel. torch.compile cannot trace fbgemm's packed weights."""

    traceable = False

    @staticmethod
    def min_batch_size(dtype: torch.dtype) -> int:
        return 2

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        low, high = torch.aminmax(weight)  # no temporary the size of the weight
        return bool(max(-low, high) <= torch.finfo(torch.float16).max)

    @staticmethod
    def pack_block(weight: torch.Tensor) -> Any:
        return torch.ops.quantized.linear_prepack_fp16(weight, None)

    @staticmethod
    def block_product(rows: torch.Tensor, block: Any) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(rows.float(), block).to(rows.dtype)


def packing_for(dtype: torch.dtype, device: torch.device) -> Optional[type]:
    """The PackedLinear kernel for weights of `dtype` on `device`, if any: oneDNN for float32, and for bfloat16
    where the CPU has native bfloat16 kernels; fbgemm's float16 kernel for bfloat16 and float16 where it has
    not (see needs_upcast) but has AVX2."""
    if device.type != "cpu":
        return None
    native_bf16 = dtype == torch.bfloat16 and not needs_upcast(dtype, device)
    if torch.backends.mkldnn.is_available() and (dtype == torch.float32 or native_bf16):
        return OneDNNLinear
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    if needs_upcast(dtype, device) and fbgemm and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return HalfPackedLinear
    return None


def _pack(module: nn.Module, kernel: type, release: Optional[Callable[[torch.Tensor], None]]) -> None:
    """Make the fairscale linear `module` one computing with its weight through `kernel` (a PackedLinear), packed
    a block of rows at a time, each block `release`d (if given) once packed."""
    weight = module.weight.detach()
    del module.weight
    rows = max(1, PACK_BLOCK_BYTES // (weight.shape[1] * weight.element_size()))
    blocks = []
    for begin in range(0, weight.shape[0], rows):
        blocks.append(kernel.pack_block(weight[begin : begin + rows]))
        if release is not None:
            release(weight[begin : begin + rows])
    module.blocks = blocks
    as_rank_linear(module, kernel)


def _fused(parent: nn.Module, names: List[str], release: Optional[Callable[[torch.Tensor], None]]) -> nn.Module:
    """One column-parallel layer in place of the layers `names` of `parent` (removed), computing their outputs
    side by side: each of its parameters and buffers stacks the layers' rows."""
    layers = [getattr(parent, name) for name in names]
    fused = layers[0]
    for name, tensor in [*fused.named_parameters(recurse=False), *fused.named_buffers(recurse=False)]:
        parts = [getattr(layer, name).detach() for layer in layers]
        stacked = torch.cat(parts)
        for part in parts if release is not None else []:
            release(part)
        if isinstance(tensor, nn.Parameter):
            setattr(fused, name, nn.Parameter(stacked, requires_grad=False))
        else:
            setattr(fused, name, stacked)
    for name in names:
        delattr(parent, name)
    return fused


@contextlib.contextmanager
def skip_weight_init():
    """Build fairscale layers without initializing their weights, for weights that get loaded anyway.

    fairscale fills a rank's weight from a full-size master matrix it allocates, which costs time and
    memory and cannot work on the meta device; with this, the uninitialized weights are never touched.
    """
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original


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

    def optimize_for_inference(
        self, release: Optional[Callable[[torch.Tensor], None]] = None, *, traceable: bool = False
    ) -> None:
        """Fuse the projections (see fuse_projections) and give every linear layer the fastest unquantized kernel:
        prepacked where `packing_for` has one that pays off at this max_batch_size (see PackedLinear), else
        F.linear without fairscale's wrappers on a single rank (see DirectLinear); with `traceable`, only kernels
        that torch.compile can trace. `release(weight)`, if given, is called on each weight once packed: the
        weights are then this model's alone, and the call may free their memory."""
        self.fuse_projections(release)
        weight = self.tok_embeddings.weight
        kernel = packing_for(weight.dtype, weight.device)
        if kernel is not None and (
            (traceable and not kernel.traceable) or self.params.max_batch_size < kernel.min_batch_size(weight.dtype)
        ):
            kernel = None
        packed = []
        for module in self.fairscale_linear_layers():
            if module is self.output and self.output_is_tied():
                as_rank_linear(module, DirectLinear)  # computes with the embedding matrix itself: held once
            elif kernel is not None and kernel.fits(module.weight):
                packed.append(module)
            else:
                as_rank_linear(module, DirectLinear)  # same weight, still in use: nothing to release
        # Packing runs outside the GIL: layers pack in parallel (2 threads: 1.6x as fast).
        with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
            list(pool.map(lambda module: _pack(module, kernel, release), packed))

    def compile_decoding(self, *, autotune: bool = False) -> None:
        """Run decode steps of a single sequence (one new token) through torch.compile: inductor fuses the small
        operations around the matrix products. The position is a dynamic size in the graph, so one graph serves
        every position and attends over the written cache only. The first such step compiles (20-40 s for the
        demo model on 2 cores, 50-80 s with `autotune`); later processes take the graph from inductor's on-disk
        cache (4.5-6.5 s, 12-21 s with `autotune`). Batches stay eager: with frozen weights and the flash kernel,
        compiled batch-8 steps of the demo model were no faster (float32) or 8% slower (bfloat16, int8); this
        graph's batch-8 steps are faster (bfloat16 1.29x, float32 1.14x), but a batch shrinking to one sequence
        would then compile a second graph in the middle of a generation.

        The weights stay inputs of the graph (oneDNN-packed ones through the operator llama::onednn_linear, plain
        16-bit ones through llama::matrix_vector), except with `autotune`: then inductor freezes them into the
        graph as constants and times its own matrix kernels against torch's, keeping the faster. That is for int8
        and int4 weights, whose torch kernels are slow (demo model, AVX512-BF16 CPU, steps over the whole cache:
        int4 4.3 against 6.0 ms, int8 6.7 against 7.1; unfrozen, int8 weights leave inductor only torch's kernel:
        compiled over eager 1.28x instead of 1.53-1.61x); it slowed prepacked bfloat16 steps (15 against 11 ms)
        and did not change float32's. Freezing oneDNN-packed weights gave steps no faster than leaving them inputs,
        and graphs the cache cannot store (compiled anew in every process: 21-24 s against 4-6 s)."""
        import torch._inductor.config as inductor_config

        if fs_init.get_model_parallel_world_size() > 1:
            raise ValueError("compiling needs a single process: run without torchrun or leave compile off")
        compiled = torch.compile(self._decode_step, fullgraph=True)
        if autotune:  # inductor's settings are read when compiling, at the first call
            compiled = inductor_config.patch(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")(
                compiled
            )
        self.compiled_step = compiled

    def warm_up_decoding(self) -> None:
        """Run one decode step now, so that a compiled step compiles here rather than in the middle of the first
        answer. It writes positions 0 and 1 of the caches' first row, which every generation writes before it reads."""
        token = torch.zeros((1, 1), dtype=torch.long, device=self.rope.device)
        for position in range(min(2, self.params.max_seq_len)):  # a prompt token, then a decode step if it fits
            self.forward(token, position)

    def fuse_projections(self, release: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Make wq, wk, wv one layer `attention.wqkv` and w1, w3 one layer `feed_forward.w13`: one matrix product
        each instead of three and two. The fused layer's weight (and any other per-row tensor, such as int8
        scales) stacks a rank's rows of each. `release`, if given, is called on the originals once copied."""
        for layer in self.layers:
            attention, feed_forward = layer.attention, layer.feed_forward
            attention.wqkv = _fused(attention, ["wq", "wk", "wv"], release)
            feed_forward.w13 = _fused(feed_forward, ["w1", "w3"], release)

    def convert_linear_layers(
        self,
        convert: Callable[[nn.Module, torch.Tensor], None],
        release: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> None:
        """Fuse the projections (see fuse_projections), then call `convert(layer, weight)` on every bias-free
        fairscale linear layer, which must then compute with `weight` in its own way. `release`, if given, is
        called on every weight once it is no longer needed."""
        self.fuse_projections(release)
        tied = self.output_is_tied()
        for module in self.fairscale_linear_layers():
            weight = module.weight.detach()
            del module.weight
            convert(module, weight)
            if release is not None and not (tied and module is self.output):  # the embedding is still in use
                release(weight)

    def output_is_tied(self) -> bool:
        """Whether the output projection's weight is the embedding matrix itself (a tied checkpoint, loaded)."""
        output, embedding = getattr(self.output, "weight", None), self.tok_embeddings.weight
        return (
            isinstance(output, torch.Tensor)
            and not output.is_meta
            and output.shape == embedding.shape
            and output.data_ptr() == embedding.data_ptr()
        )

    def fairscale_linear_layers(self) -> List[nn.Module]:
        """The bias-free fairscale linear layers not yet converted to another class."""
        return [m for m in self.modules() if type(m) in (ColumnParallelLinear, RowParallelLinear) and m.bias is None]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Compact the KV caches so that batch rows `rows` (in this order) become rows 0, 1, ..."""
        for layer in self.layers:
            attention = layer.attention
            attention.cache_k[: len(rows)] = attention.cache_k[rows]
            attention.cache_v[: len(rows)] = attention.cache_v[rows]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        """Float32 logits (bs, seqlen, vocab) for `tokens` (bs, seqlen) placed at positions start_pos...

        With `last_only`, only the last position's logits are computed: (bs, 1, vocab).
        """
        bsz, seqlen = tokens.shape
        if self.rope is None:  # Meta's usage: caches made on the first forward
            with torch.inference_mode(False):  # ordinary tensors, as setup_caches makes them
                self.setup_caches(self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device)
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

    def _decode_step(self, tokens: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Logits (bs, 1, vocab) for `tokens` (bs, 1) at the last position of `rotations` (the RoPE table up to
        it): compiled, one graph serves every position, since the position is a dynamic size."""
        start_pos = rotations.shape[0] - 1
        return self._logits(tokens, start_pos, rotations[start_pos:], None)

    def _logits(self, tokens, start_pos, rotations, mask, last_only=False) -> torch.Tensor:
        if fs_init.get_model_parallel_world_size() == 1:
            h = F.embedding(tokens, self.tok_embeddings.weight)  # without fairscale's wrappers
        else:
            h = self.tok_embeddings(tokens)
        rope = rope_factors(rotations)
        for layer in self.layers:
            h = layer(h, start_pos, rope, mask)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
