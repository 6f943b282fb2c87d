"""Weight-only quantization of the linear layers: int8 with one scale per output channel, or int4 (CPU only)
with a scale and offset per group of input channels.

The layers stay fairscale ColumnParallelLinear/RowParallelLinear modules (same model-parallel communication);
only their weight changes. Activations keep the model's dtype. int8: on the CPU, a few rows at a time
(decoding) go through torch's int8 matrix-vector kernel, which reads half the bytes of bfloat16; more rows
(prefill, large batches) dequantize the weight and use a dense matmul. int4 goes through torch's CPU int4
kernel (bfloat16 activations), reading a quarter of the bytes.

    python -m llama.quantize evaluate [--ckpt_dir DIR] [--methods int8,int4] [--tokens 16384]
    python -m llama.quantize write --ckpt_dir DIR --out_dir OUT [--method int8]

`evaluate` compares the perplexity of the quantized model with bfloat16's on a fixed English text; `write`
stores a checkpoint quantized (int8), which then loads as such.
"""

import json
import math
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import (
    QUANTIZATION_FILE, QUANTIZED_METHODS, CheckpointError, ShardedCheckpoint, linear_weight_keys, parameter_layout,
    read_params, scale_key, staged_directory,
)
from .model import ModelArgs, Transformer, RankLinear, as_rank_linear, blockwise_linear, needs_upcast
from .tokenizer import SPEC_FILE

QUANTIZATIONS = ("int8", "int4")
# int4 groups of input channels: the first of these that divides a layer's input width (smaller is more exact).
INT4_GROUP_SIZES = (32, 64, 128)
# Up to this many rows, torch's int8 kernel beats dequantizing the weight (measured on AVX512 CPUs).
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
    model: Transformer, method: str = "int8", release: Optional[Callable[[torch.Tensor], None]] = None
) -> None:
    """Quantize every linear layer of `model` in place, projections fused; embeddings and norms keep the model's
    dtype. `release` is called on each original weight once quantized (see Transformer.convert_linear_layers)."""
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

    model.convert_linear_layers(to_int8 if method == "int8" else to_int4, release)


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


def int8_layers_for_loading(model: Transformer) -> None:
    """Make every bias-free linear layer of `model` (built on the meta device) an int8 one with an int8 weight
    and a `scale` buffer of the right shapes, so a quantized checkpoint's tensors load into it."""
    for module in model.fairscale_linear_layers():
        rows, columns = module.weight.shape
        device = module.weight.device
        module.weight = nn.Parameter(torch.empty(rows, columns, dtype=torch.int8, device=device), requires_grad=False)
        module.register_buffer("scale", torch.empty(rows, device=device))
        as_rank_linear(module, Int8Linear)


def write_quantized(ckpt_dir: str, out_dir: str, method: str = "int8") -> Path:
    """Write the Meta checkpoint in `ckpt_dir` to the new directory `out_dir` with int8 linear weights and their
    scales, shard for shard, plus quantization.json: `Llama.build(out_dir)` then loads it quantized, on any
    number of processes, with the same weights as `quantize="int8"` on the original, from a quarter of
    float32's bytes. Embeddings and norms keep their dtype."""
    check_method(method)
    if method not in QUANTIZED_METHODS:
        raise ValueError(f"only {', '.join(QUANTIZED_METHODS)} checkpoints can be written (int4 is packed for one kernel)")
    ckpt_dir = Path(ckpt_dir)
    args = ModelArgs(**read_params(ckpt_dir))
    checkpoint = ShardedCheckpoint(ckpt_dir, args)
    if checkpoint.quantization:
        raise CheckpointError(f"{ckpt_dir} is already quantized ({checkpoint.quantization}): pass the original checkpoint")
    layout = parameter_layout(args)
    linear = set(linear_weight_keys(layout))
    with staged_directory(Path(out_dir)) as staging:
        for name in ("params.json", "tokenizer.model", SPEC_FILE):
            if (ckpt_dir / name).is_file():
                shutil.copyfile(ckpt_dir / name, staging / name)
        (staging / QUANTIZATION_FILE).write_text(json.dumps({"method": method}))
        for path, shard in zip(tqdm(checkpoint.paths, desc="quantizing", unit="shard"), checkpoint.shards):
            state = {}
            for key, (_, dim) in layout.items():
                if key not in linear:
                    state[key] = shard[key].clone()  # a view would save its whole source storage
                    continue
                # Row-parallel shards hold part of each row: the scale comes from the whole row.
                row_max = None
                if dim == 1:
                    row_max = torch.stack([s[key].float().abs().amax(dim=1) for s in checkpoint.shards]).amax(dim=0)
                state[key], state[scale_key(key)] = quantize_weight(shard[key], row_max)
            torch.save(state, staging / path.name)
    return Path(out_dir)


def reference_text() -> str:
    """A fixed English text of about 450 KB that ships with Python: the language reference topics of pydoc."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def evaluate(
    ckpt_dir: Optional[str] = None,
    methods: Sequence[str] = QUANTIZATIONS,
    dtype: str = "bfloat16",
    tokens: int = 16384,
    window: int = 512,
) -> None:
    """Print the perplexity on the first `tokens` tokens of `reference_text()` in `dtype` and with each
    quantization `method`, with the change from the unquantized figure (the demo model unless `ckpt_dir`)."""
    from .demo import demo_checkpoint_dir
    from .generation import Llama

    if isinstance(methods, str):
        methods = methods.split(",")
    for method in methods:
        check_method(method)
    ckpt_dir = str(ckpt_dir or demo_checkpoint_dir())
    results = {}
    for method in [None, *methods]:
        generator = Llama.build(ckpt_dir, max_seq_len=window, max_batch_size=1, dtype=dtype, device="cpu", quantize=method)
        text_tokens = generator.tokenizer.encode(reference_text(), bos=False, eos=False)[:tokens]
        if len(text_tokens) < tokens:
            raise ValueError(f"the reference text has only {len(text_tokens)} tokens: ask for fewer")
        results[method or dtype] = perplexity(generator.model, text_tokens, window)
        del generator
    base = results[dtype]
    for name, value in results.items():
        print(f"{name}: perplexity {value:.4f} ({value / base - 1:+.2%} vs {dtype}) on {tokens} tokens")


if __name__ == "__main__":
    from .cli import run_cli

    from .convert import announcing

    run_cli({"evaluate": evaluate, "write": announcing(write_quantized, "a quantized checkpoint")})
