"""Writing a checkpoint quantized (int8 weights and their scales), which then loads quantized by itself.

    llama quantize --ckpt_dir DIR --out_dir OUT [--method int8]
"""

import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import (
    EMBEDDING_KEY, OUTPUT_KEY, QUANTIZATION_FILE, QUANTIZED_METHODS, CheckpointError, ShardedCheckpoint,
    linear_weight_keys, parameter_layout, read_params, scale_key, staged_directory,
)
from .command import announcing, run_cli
from .model import ModelArgs
from .quantized_linear import check_method, quantize_weight
from .tokenizer import SPEC_FILE


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
                stored = EMBEDDING_KEY if key == OUTPUT_KEY and checkpoint.output_absent else key  # tied
                state[key], state[scale_key(key)] = quantize_weight(shard[stored], row_max)
            torch.save(state, staging / path.name)
    return Path(out_dir)


def quantize(ckpt_dir: str, out_dir: str, method: str = "int8") -> None:
    """Write the checkpoint in --ckpt_dir to the new directory --out_dir with int8 weights."""
    announcing(write_quantized, "a quantized checkpoint")(ckpt_dir, out_dir, method)


if __name__ == "__main__":
    from .eval import evaluate  # `python -m llama.quantize evaluate` as before `llama eval`

    run_cli({"write": quantize, "evaluate": evaluate})
