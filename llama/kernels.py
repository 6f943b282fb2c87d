"""The fast paths under the model: CPU matrix products for the linear layers and two attention variants.

The model (llama.model) stays Meta's; these replace its products and attention where they are faster on a CPU
and compute the same. Measurements behind each choice are in docs/performance.md.
"""

import functools
from typing import Any, Callable, List, Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear
from fairscale.nn.model_parallel.mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)
from torch import nn

# Weights are packed (or converted on the fly) in row blocks of at most this many bytes, to need little extra memory.
PACK_BLOCK_BYTES = 16 << 20
# Products of at least this many rows run in float32 where the CPU lacks native bfloat16/float16 kernels.
UPCAST_MIN_ROWS = 32
# Queries per block of blocked_causal_attention, fewer where their scores would take more bytes than this.
ATTENTION_BLOCK_ROWS = 128
ATTENTION_BLOCK_BYTES = 32 << 20


@functools.lru_cache()
def needs_upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether matrix products in `dtype` on `device` lack native CPU kernels (bfloat16 without AVX512-BF16 or
    AMX, float16 without AVX512-FP16): torch then emulates them, and products of many rows are faster in float32."""
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported()


def blockwise_linear(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """F.linear(x, weight) computed in `dtype`, converting at most PACK_BLOCK_BYTES of weight rows at a time."""
    rows = max(1, PACK_BLOCK_BYTES // (weight.shape[1] * dtype.itemsize))
    x = x.to(dtype)
    outputs = [F.linear(x, block.to(dtype)) for block in weight.split(rows)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Attention

def blocked_causal_attention(
    xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start_pos: int
) -> torch.Tensor:
    """Causal attention of queries xq (bs, seqlen, n_heads, head_dim) at positions start_pos... over keys and
    values (bs, n_kv_heads, start_pos + seqlen, head_dim), as plain matrix products over blocks of queries, each
    reaching only the keys its last query sees; softmax in float32. Returns (bs, seqlen, n_heads, head_dim).
    Faster than the flash kernel for 16-bit prompts on CPUs with native 16-bit products."""
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
    head_dim), every position visible, in float32, written as products and sums that torch.compile fuses into
    loops (eagerly it would materialize every product, so eager decoding uses the flash kernel)."""
    scores = (xq.float()[:, :, :, None] * keys.float()[:, :, None]).sum(-1)  # (bs, n_kv_heads, rows, positions)
    probs = torch.softmax(scores * xq.shape[-1] ** -0.5, dim=-1)
    return (probs[..., None] * values.float()[:, :, None]).sum(-2).type_as(xq)  # (bs, n_kv_heads, rows, head_dim)


def attends_in_blocks(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether prompts attend through blocked_causal_attention rather than the flash kernel: 16-bit on CPUs with
    native 16-bit products."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not needs_upcast(dtype, device)


# ---------------------------------------------------------------------------------------------------------------
# Linear layers

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
    for the call (process-wide). For 16-bit values it sums in float32 as oneDNN does, at a fraction of oneDNN's
    fixed cost per call; for more rows oneDNN is faster."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(row, weight)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


opaque_product("matrix_vector", matrix_vector, ("CPU",))  # compiled decode steps call it as it is


def batch_invariant_linear(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(rows, weight) for float32 on a CPU through oneDNN, with a single row computed as two: from two
    rows on, oneDNN computes each row the same whatever their number (as it does with packed weights), so a
    row's result does not depend on the rows beside it. Faster than F.linear for a few rows, as fast for one."""
    flat = rows.reshape(-1, rows.shape[-1])
    if flat.shape[0] == 1:
        return _onednn_linear(flat.expand(2, -1).contiguous(), weight)[:1].view(*rows.shape[:-1], -1)
    return _onednn_linear(flat, weight).view(*rows.shape[:-1], -1)


class DirectLinear(RankLinear):
    """Mixin for a fairscale linear layer computing with its weight as it is (see RankLinear): single 16-bit rows
    on the CPU through `matrix_vector`, in float32 products of many rows where `needs_upcast`, and float32 rows
    through `batch_invariant_linear`."""

    weight: nn.Parameter

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.dtype == torch.float32 and rows.device.type == "cpu" and not torch.compiler.is_compiling():
            return batch_invariant_linear(rows, self.weight)
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
    the same products as F.linear, faster where torch's plain kernels are slow. The blocks are opaque, so such a
    model is for inference only. Subclasses give the kernel (`pack_block`, `block_product`) and
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
    """Weights prepacked for oneDNN (float32, and bfloat16 on CPUs with AVX512-BF16 or AMX), laid out for
    products of `rows_hint` rows."""

    rows_hint = 8

    @staticmethod
    def min_batch_size(dtype: torch.dtype) -> int:
        return 1 if dtype == torch.float32 else 2  # single 16-bit rows are faster through matrix_vector

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


# oneDNN's product as an operator inductor knows nothing about: its own lowering needs the packed weights frozen
# into the graph, which then cannot go into inductor's on-disk cache; through this operator they stay inputs.
opaque_product("onednn_linear", _onednn_linear, ("CPU", "MkldnnCPU"))  # dense rows, opaque packed block


class HalfPackedLinear(PackedLinear):
    """bfloat16 (or float16) weights held as float16 in fbgemm's packed layout, multiplied in float32 with AVX2
    and F16C, for CPUs without native bfloat16 products. A bfloat16 weight converts to float16 exactly unless
    its magnitude is below float16's normal range (a rounding below 3e-8 remains); `fits` rejects weights above
    its largest value. torch.compile cannot trace fbgemm's packed weights."""

    traceable = False

    @staticmethod
    def min_batch_size(dtype: torch.dtype) -> int:
        return 2  # no gain for single rows

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
