"""Weight-only int8 quantization: every linear layer's weight as int8 with one scale per output channel.

The layers stay fairscale ColumnParallelLinear/RowParallelLinear modules (same names, same model-parallel
communication); only their weight becomes int8 and a `scale` buffer joins it. Activations keep the model's
dtype. On the CPU, a few rows at a time (decoding) go through torch's int8 matrix-vector kernel, which reads
half the bytes of bfloat16; more rows (prefill, large batches) dequantize the weight and use a dense matmul.
"""

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from .model import Transformer, parallel_linear

QUANTIZATIONS = ("int8",)
# Up to this many rows, torch's int8 kernel beats dequantizing the weight (measured on AVX512 CPUs).
INT8_KERNEL_MAX_ROWS = 4


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, float32 scale per row) with weight ~ q * scale."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scale).T for an int8 `weight` (out, in) and per-row `scale` (out,) in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])  # (tokens, in_features)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
        out = torch._weight_int8pack_mm(rows.contiguous(), weight, scale)
        return out.view(*x.shape[:-1], -1)  # (..., out_features)
    return F.linear(x, weight.to(x.dtype)) * scale


class Int8Linear:
    """Mixin for a fairscale linear layer whose weight is int8 with per-row scales."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return parallel_linear(self, x, lambda rows: int8_linear(rows, self.weight, self.scale))


class Int8ColumnParallelLinear(Int8Linear, ColumnParallelLinear):
    pass


class Int8RowParallelLinear(Int8Linear, RowParallelLinear):
    pass


INT8_CLASSES = {ColumnParallelLinear: Int8ColumnParallelLinear, RowParallelLinear: Int8RowParallelLinear}


def quantize_model(model: Transformer, method: str = "int8") -> None:
    """Quantize every linear layer of `model` in place (embeddings and norms keep the model's dtype)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}: use one of {', '.join(QUANTIZATIONS)}")
    for module in model.modules():
        if type(module) not in INT8_CLASSES or module.bias is not None:
            continue
        dtype = module.weight.dtype
        weight, scale = quantize_weight(module.weight)
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.register_buffer("scale", scale.to(dtype))
        module.__class__ = INT8_CLASSES[type(module)]


@torch.inference_mode()
def perplexity(model: Transformer, tokens: List[int], window: int) -> float:
    """Perplexity of `model` on `tokens`, scored in consecutive windows of `window` tokens (each window
    starts fresh, its first token is context only)."""
    if window < 2 or len(tokens) < 2:
        raise ValueError("perplexity needs a window and a text of at least 2 tokens")
    total, count = 0.0, 0
    for begin in range(0, len(tokens) - 1, window - 1):
        chunk = torch.tensor([tokens[begin : begin + window]])  # (1, up to window), at least 2 tokens
        logprobs = torch.log_softmax(model.forward(chunk, 0), dim=-1)[0, :-1]  # (window - 1, vocab)
        total -= logprobs.gather(-1, chunk[0, 1:, None]).sum().item()
        count += chunk.shape[1] - 1
    return math.exp(total / count)
