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
from .optimize import Release, convert_linear_layers, linear_layers

QUANTIZATIONS = ("int8", "int4")
# int4 groups of input channels: the first of these that divides a layer's input width (smaller is more exact).
INT4_GROUP_SIZES = (32, 64, 128)
# Up to this many rows, torch's int8 kernel beats dequantizing the weight.
INT8_KERNEL_MAX_ROWS = 16


def quantize_weight(weight: torch.Tensor, row_max: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, float32 scale per row) with weight ~ q * scale.
    `row_max`: each row's largest magnitude, if the rows are longer than `weight` (a shard of them)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) if row_max is None else row_max.float()).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


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


def quantize_weight_int4(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` input channels, packed for torch's CPU kernel: (packed weight,
    bfloat16 scales and offsets (in / group_size, out, 2)) with weight ~ (q - 8) * scale + offset, q in 0..15."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).view(out_features, in_features)
    offset = low + 8 * scale
    scales_and_offsets = torch.stack([scale.squeeze(-1), offset.squeeze(-1)], dim=-1)  # (out, groups, 2)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_offsets.transpose(0, 1).contiguous().bfloat16()


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


def quantize_model(
    model: Transformer, method: str = "int8", release: Release = None
) -> None:
    """Quantize every linear layer of `model` in place, projections fused; embeddings and norms keep the model's
    dtype. `release` is called on each original weight once quantized (see llama.optimize.convert_linear_layers)."""
    check_method(method)
    if method == "int4" and model.tok_embeddings.weight.device.type != "cpu":
        raise ValueError("int4 quantization runs on the CPU only: use device='cpu', or quantize='int8'")

    def to_int8(module: nn.Module, weight: torch.Tensor) -> None:
        q, scale = quantize_weight(weight)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.register_buffer("scale", scale.to(weight.dtype))
        as_rank_linear(module, Int8Linear)

    def to_int4(module: nn.Module, weight: torch.Tensor) -> None:
        sizes = [size for size in INT4_GROUP_SIZES if weight.shape[1] % size == 0]
        if not sizes:
            raise ValueError(
                f"int4 needs layer input widths divisible by {INT4_GROUP_SIZES[-1]}, and this model has "
                f"{weight.shape[1]}: use quantize='int8'"
            )
        q, scales_and_offsets = quantize_weight_int4(weight, sizes[0])
        module.weight = nn.Parameter(q, requires_grad=False)
        module.register_buffer("scales_and_offsets", scales_and_offsets)
        module.group_size = sizes[0]
        as_rank_linear(module, Int4Linear)

    convert_linear_layers(model, to_int8 if method == "int8" else to_int4, release)


def int8_layers_for_loading(model: Transformer) -> None:
    """Make every bias-free linear layer of `model` (built on the meta device) an int8 one with an int8 weight
    and a `scale` buffer of the right shapes, so a quantized checkpoint's tensors load into it."""
    for module in linear_layers(model):
        rows, columns = module.weight.shape
        device = module.weight.device
        module.weight = nn.Parameter(torch.empty(rows, columns, dtype=torch.int8, device=device), requires_grad=False)
        module.register_buffer("scale", torch.empty(rows, device=device))
        as_rank_linear(module, Int8Linear)
