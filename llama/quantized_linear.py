"""Weight-only quantized linear layers: int8 with one scale per output channel, or int4 (CPU only) with a scale
and offset per group of input channels.

The layers stay fairscale ColumnParallelLinear/RowParallelLinear modules (same model-parallel communication);
only their weight changes, and activations keep the model's dtype. int8: a few rows at a time (decoding) go
through torch's int8 matrix-vector kernel on the CPU; more rows dequantize the weight for a dense product. int4
goes through torch's CPU int4 kernel with bfloat16 activations.
"""

from typing import Optional, Tuple

import torch
from torch import nn

from .kernels import RankLinear, as_rank_linear, blockwise_linear, needs_upcast
from .model import Transformer
from .optimize import Convert, Load, Release, convert_linear_layers, linear_layers, row_blocks

QUANTIZATIONS = ("int8", "int4")
# int4 groups of input channels: the first of these that divides a layer's input width (smaller is more exact).
INT4_GROUP_SIZES = (32, 64, 128)
# torch's CPU int4 packing lays rows out in groups of 64 (AVX512) or 32 (otherwise).
INT4_PACK_ROWS = 64
# Up to this many rows, torch's int8 kernel beats dequantizing the weight.
INT8_KERNEL_MAX_ROWS = 16
# Weights are quantized in blocks of rows of about this many bytes in float32 (the size of a block's temporary):
# smaller blocks need less memory, but each costs a few operations (slow where threads wait for a busy core).
QUANTIZE_BLOCK_BYTES = 16 << 20


def _quantized_rows(weight: torch.Tensor) -> int:
    """How many rows of `weight` to quantize at a time: QUANTIZE_BLOCK_BYTES of float32, in whole INT4_PACK_ROWS."""
    rows = QUANTIZE_BLOCK_BYTES // (weight.shape[1] * 4) // INT4_PACK_ROWS * INT4_PACK_ROWS
    return max(INT4_PACK_ROWS, rows)


def quantize_weight(
    weight: torch.Tensor, row_max: Optional[torch.Tensor] = None, release: Release = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, float32 scale per row) with weight ~ q * scale.
    `row_max`: each row's largest magnitude, if the rows are longer than `weight` (a shard of them). Computed a
    block of rows at a time, each then passed to `release` (if given; see llama.optimize.row_blocks)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for begin, rows in row_blocks(weight, _quantized_rows(weight), release):
        end = begin + rows.shape[0]
        w = rows.to(torch.float32, copy=True)  # the one temporary: changed in place
        peak = torch.linalg.vector_norm(w, float("inf"), dim=1) if row_max is None else row_max[begin:end].float()
        scale[begin:end] = peak.clamp(min=1e-12) / 127
        q[begin:end] = w.div_(scale[begin:end, None]).round_().clamp_(-127, 127)
    return q, scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scale).T for an int8 `weight` (out, in) and per-row `scale` (out,) in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])  # (tokens, in_features)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
        out = torch._weight_int8pack_mm(rows.contiguous(), weight, scale)
        return out.view(*x.shape[:-1], -1)  # (..., out_features)
    compute = torch.float32 if needs_upcast(x.dtype, x.device) else x.dtype
    return (blockwise_linear(x, weight, compute) * scale).to(x.dtype)


class Int8Linear(RankLinear):
    """Mixin for a fairscale linear layer whose weight is int8 with per-row scales."""

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return int8_linear(rows, self.weight, self.scale)


def _int4_rows(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """quantize_weight_int4 of all of `weight`'s rows at once: (packed rows, scales and offsets (groups, out, 2))."""
    out_features, in_features = weight.shape
    groups = weight.to(torch.float32, copy=True).view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = groups.sub_(low).div_(scale).round_().clamp_(0, 15).to(torch.int32).view(out_features, in_features)
    offset = low + 8 * scale
    scales_and_offsets = torch.stack([scale.squeeze(-1), offset.squeeze(-1)], dim=-1)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_offsets.transpose(0, 1).bfloat16()


def quantize_weight_int4(
    weight: torch.Tensor, group_size: int, release: Release = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` input channels, packed for torch's CPU kernel: (packed weight,
    bfloat16 scales and offsets (in / group_size, out, 2)) with weight ~ (q - 8) * scale + offset, q in 0..15.
    Computed a block of rows at a time, each then passed to `release` (if given); the kernel packs rows in
    groups of up to INT4_PACK_ROWS, so blocks of whole groups pack as the whole weight would."""
    out_features, in_features = weight.shape
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=weight.device)
    scales_and_offsets = torch.empty(
        in_features // group_size, out_features, 2, dtype=torch.bfloat16, device=weight.device
    )
    for begin, rows in row_blocks(weight, _quantized_rows(weight), release):
        end = begin + rows.shape[0]
        packed[begin:end], scales_and_offsets[:, begin:end] = _int4_rows(rows, group_size)
    return packed, scales_and_offsets


class Int4Linear(RankLinear):
    """Mixin for a fairscale linear layer whose weight is packed int4 with per-group scales and offsets."""

    group_size: int

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1, rows.shape[-1]).to(torch.bfloat16)  # (tokens, in_features)
        out = torch._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scales_and_offsets)
        return out.to(rows.dtype).view(*rows.shape[:-1], -1)  # (..., out_features)


def check_method(method: str) -> None:
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}: use one of {', '.join(QUANTIZATIONS)}")


def _to_int8(module: nn.Module, weight: torch.Tensor, release: Release) -> None:
    """Make the linear `module` an Int8Linear computing with `weight` quantized (scales in its dtype)."""
    q, scale = quantize_weight(weight, release=release)
    module.weight = nn.Parameter(q, requires_grad=False)
    module.register_buffer("scale", scale.to(weight.dtype))
    as_rank_linear(module, Int8Linear)


def _to_int4(module: nn.Module, weight: torch.Tensor, release: Release) -> None:
    """Make the linear `module` an Int4Linear computing with `weight` quantized in the smallest group size."""
    sizes = [size for size in INT4_GROUP_SIZES if weight.shape[1] % size == 0]
    if not sizes:
        raise ValueError(
            f"int4 needs layer input widths divisible by {INT4_GROUP_SIZES[-1]}, and this model has "
            f"{weight.shape[1]}: use quantize='int8'"
        )
    q, scales_and_offsets = quantize_weight_int4(weight, sizes[0], release=release)
    module.weight = nn.Parameter(q, requires_grad=False)
    module.register_buffer("scales_and_offsets", scales_and_offsets)
    module.group_size = sizes[0]
    as_rank_linear(module, Int4Linear)


def quantize_model(
    model: Transformer,
    method: str = "int8",
    release: Release = None,
    load: Load = None,
) -> None:
    """Quantize every linear layer of `model` in place, projections fused; embeddings and norms keep the model's
    dtype. `release` frees each original weight as it is quantized, `load` loads a block's weights just before
    (see llama.optimize.convert_linear_layers): loading a model this way holds its quantized weights and one
    block of the original ones, never the whole model unquantized."""
    check_method(method)
    if method == "int4" and model.tok_embeddings.weight.device.type != "cpu":
        raise ValueError("int4 quantization runs on the CPU only: use device='cpu', or quantize='int8'")
    convert: Convert = _to_int8 if method == "int8" else _to_int4
    convert_linear_layers(model, convert, release, load)


def int8_layers_for_loading(model: Transformer) -> None:
    """Make every bias-free linear layer of `model` (built on the meta device) an int8 one with an int8 weight
    and a `scale` buffer of the right shapes, so a quantized checkpoint's tensors load into it."""
    for module in linear_layers(model):
        rows, columns = module.weight.shape
        device = module.weight.device
        module.weight = nn.Parameter(torch.empty(rows, columns, dtype=torch.int8, device=device), requires_grad=False)
        module.register_buffer("scale", torch.empty(rows, device=device))
        as_rank_linear(module, Int8Linear)
