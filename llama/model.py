"""The Llama 3 transformer, laid out in fairscale model-parallel layers exactly as Meta's shards are."""

import contextlib
import functools
import math
from dataclasses import dataclass, fields
from typing import Optional, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

# Llama 3.1 RoPE scaling constants.
ROPE_SCALE_FACTOR = 8.0
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192


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
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Rotation frequency of each pair of a head's dimensions, with Llama 3.1 scaling if asked for."""
    head_dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if not args.use_scaled_rope:
        return freqs
    low_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR
    high_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR
    wavelen = 2 * math.pi / freqs
    # Between the two wavelengths, blend the scaled and unscaled frequency linearly in context/wavelength.
    smooth = (ROPE_ORIGINAL_CONTEXT / wavelen - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
    blended = (1 - smooth) * freqs / ROPE_SCALE_FACTOR + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / ROPE_SCALE_FACTOR, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def rope_tables(args: ModelArgs, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine of every position's rotation angles, each (length, head_dim // 2), float32."""
    angles = torch.outer(torch.arange(length, dtype=torch.float32), rope_frequencies(args))
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (bs, seqlen, heads, head_dim) by the given angles."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (bs, seqlen, heads, head_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (seqlen, 1, head_dim // 2)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


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
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None

    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device):
        shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.cache_k = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_v = torch.zeros(shape, dtype=dtype, device=device)

    def forward(
        self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rope(xq, cos, sin), apply_rope(xk, cos, sin)

        end_pos = start_pos + seqlen
        self.cache_k[:bsz, :, start_pos:end_pos] = xk.transpose(1, 2)
        self.cache_v[:bsz, :, start_pos:end_pos] = xv.transpose(1, 2)
        keys = self.cache_k[:bsz, :, :end_pos]  # (bs, n_local_kv_heads, cache_len + seqlen, head_dim)
        values = self.cache_v[:bsz, :, :end_pos]

        output = F.scaled_dot_product_attention(
            xq.transpose(1, 2),  # (bs, n_local_heads, seqlen, head_dim)
            keys,
            values,
            attn_mask=mask,
            enable_gqa=self.n_local_heads != self.n_local_kv_heads,
        )
        output = output.transpose(1, 2).reshape(bsz, seqlen, -1)  # (bs, seqlen, n_local_heads * head_dim)
        return self.wo(output)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=lambda x: x)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, start_pos, cos, sin, mask):
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


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
    """Llama 3 decoder. Call `setup_caches` once the weights are in place, then `forward`."""

    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = VocabParallelEmbedding(params.vocab_size, params.dim, init_method=lambda x: x)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=lambda x: x)
        self.rope_cos: Optional[torch.Tensor] = None
        self.rope_sin: Optional[torch.Tensor] = None

    def setup_caches(self, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate the KV caches (max_batch_size x max_seq_len) and the RoPE tables on `device`."""
        self.rope_cos, self.rope_sin = (t.to(device) for t in rope_tables(self.params, self.params.max_seq_len))
        for layer in self.layers:
            layer.attention.setup_cache(self.params.max_batch_size, self.params.max_seq_len, dtype, device)

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
        if start_pos + seqlen > self.params.max_seq_len:
            raise ValueError(f"positions up to {start_pos + seqlen} exceed max_seq_len {self.params.max_seq_len}")
        h = self.tok_embeddings(tokens)
        cos = self.rope_cos[start_pos : start_pos + seqlen]
        sin = self.rope_sin[start_pos : start_pos + seqlen]
        mask = None
        if seqlen > 1:
            # Causal over the new tokens; every cached position is visible.
            mask = torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=tokens.device)
            mask = mask.tril(diagonal=start_pos)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
