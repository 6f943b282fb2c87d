"""Rewrite a Meta checkpoint with a different number of shards.

    python -m llama.reshard --ckpt_dir A --out_dir B --model_parallel_size M

B gets M consolidated.NN.pth shards in Meta's layout, params.json, the tokenizer files and a checklist.chk of
md5 sums (as download.sh verifies). B appears only once complete: it is written under a temporary name
and renamed, so an interrupted run leaves nothing behind.
"""

import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import QUANTIZATION_FILE, CheckpointError, ShardedCheckpoint, read_params, staged_directory
from .command import run_cli
from .model import ModelArgs
from .tokenizer import SPEC_FILE


def reshard(ckpt_dir: str, out_dir: str, model_parallel_size: int) -> Path:
    """Write the checkpoint in --ckpt_dir to the new directory --out_dir as --model_parallel_size shards."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not isinstance(model_parallel_size, int) or model_parallel_size < 1:
        raise ValueError(f"--model_parallel_size must be a positive integer, got {model_parallel_size!r}")
    tokenizer = ckpt_dir / "tokenizer.model"
    if not tokenizer.is_file():
        raise CheckpointError(f"{tokenizer} is missing: put the checkpoint's tokenizer.model next to params.json")
    args = ModelArgs(**read_params(ckpt_dir))
    if model_parallel_size > args.n_kv_heads or args.n_kv_heads % model_parallel_size:
        raise ValueError(
            f"Meta's format splits whole key/value heads, so {args.n_kv_heads} of them allow a number of shards "
            f"that divides {args.n_kv_heads}; for more processes, load this checkpoint with any world size instead"
        )
    checkpoint = ShardedCheckpoint(ckpt_dir, args)

    with staged_directory(out_dir) as staging:
        for name in ("params.json", "tokenizer.model", SPEC_FILE, QUANTIZATION_FILE):
            if (ckpt_dir / name).is_file():
                shutil.copyfile(ckpt_dir / name, staging / name)
        with tqdm(total=model_parallel_size * len(checkpoint.stored_keys), desc="resharding", unit="tensor") as progress:
            for rank in range(model_parallel_size):
                shard = {}
                for key in checkpoint.stored_keys:
                    source_dtype = checkpoint.shards[0][key].dtype
                    # clone: a slice must not drag its whole source storage into the file
                    part = checkpoint.read(key, rank, model_parallel_size, source_dtype, torch.device("cpu"))
                    shard[key] = part.clone()
                    progress.update()
                torch.save(shard, staging / f"consolidated.{rank:02d}.pth")
                del shard
    print(f"wrote {model_parallel_size} shard(s) to {out_dir}")
    return out_dir


if __name__ == "__main__":
    run_cli(reshard)
