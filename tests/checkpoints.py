"""Small random Llama models written as Meta checkpoints, for tests."""

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import torch

from llama.tokenizer import default_tokenizer_path

# The dimension Meta's shards split each parameter on (None: every shard holds a copy).
SPLIT_DIM = {
    "tok_embeddings": 0,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "wo": 1,
    "w2": 1,
    "norm": None,
    "attention_norm": None,
    "ffn_norm": None,
}

TINY_PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 8,
    "n_kv_heads": 2,
    "vocab_size": 128256,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}
# Llama 3.1's RoPE scaling as conversions write it into params.json.
LLAMA31_SCALING_PARAMS = {
    "rope_scaling_factor": 8.0, "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_context": 8192,
}


def random_state_dict(params: dict, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Full (unsharded) random weights in Meta's names, scaled so activations stay well-conditioned."""
    gen = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    head_dim = dim // n_heads
    kv = params.get("n_kv_heads") or n_heads
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    hidden = params["multiple_of"] * ((hidden + params["multiple_of"] - 1) // params["multiple_of"])

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=gen) * (scale if scale is not None else shape[-1] ** -0.5)

    state = {
        "tok_embeddings.weight": rand(params["vocab_size"], dim, scale=1.0),
        "norm.weight": 1 + 0.1 * rand(dim, scale=1.0),
        "output.weight": rand(params["vocab_size"], dim),
    }
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        state.update(
            {
                p + "attention.wq.weight": rand(n_heads * head_dim, dim),
                p + "attention.wk.weight": rand(kv * head_dim, dim),
                p + "attention.wv.weight": rand(kv * head_dim, dim),
                p + "attention.wo.weight": rand(dim, n_heads * head_dim),
                p + "feed_forward.w1.weight": rand(hidden, dim),
                p + "feed_forward.w2.weight": rand(dim, hidden),
                p + "feed_forward.w3.weight": rand(hidden, dim),
                p + "attention_norm.weight": 1 + 0.1 * rand(dim, scale=1.0),
                p + "ffn_norm.weight": 1 + 0.1 * rand(dim, scale=1.0),
            }
        )
    return state


def write_checkpoint(
    ckpt_dir: Path, params: dict, state: Dict[str, torch.Tensor], n_shards: int = 1, dtype=torch.bfloat16
) -> Path:
    """Write `state` as Meta does: params.json, tokenizer.model and n_shards consolidated.NN.pth files."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "params.json").write_text(json.dumps(params))
    shutil.copy(default_tokenizer_path(), ckpt_dir / "tokenizer.model")
    shards = [{} for _ in range(n_shards)]
    for key, tensor in state.items():
        dim = SPLIT_DIM[key.split(".")[-2]]
        pieces = [tensor] * n_shards if dim is None else torch.chunk(tensor, n_shards, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.to(dtype).clone()
    for i, shard in enumerate(shards):
        torch.save(shard, ckpt_dir / f"consolidated.{i:02d}.pth")
    return ckpt_dir


def kill_once_writing(command: List[str], out_dir: Path, cwd: Path) -> None:
    """Start the tool `command`, which writes `out_dir`, and SIGKILL it once its staging directory has a file."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    staging = f".{out_dir.name}.partial-"
    while not any(p.name.startswith(staging) and any(p.iterdir()) for p in out_dir.parent.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, "the tool ended before it could be killed"
        time.sleep(0.005)
    process.kill()
    process.wait()
