import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")

from checkpoints import TINY_PARAMS, random_state_dict, write_checkpoint  # noqa: E402

from llama.tokenizer import Tokenizer, default_tokenizer_path  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer(default_tokenizer_path())


@pytest.fixture(scope="session")
def tiny_state():
    return random_state_dict(TINY_PARAMS)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_state) -> Path:
    """A random grouped-query, scaled-RoPE model as a one-shard float32 Meta checkpoint."""
    import torch

    return write_checkpoint(tmp_path_factory.mktemp("tiny"), TINY_PARAMS, tiny_state, 1, dtype=torch.float32)



@pytest.fixture(scope="session")
def small_q4_0_gguf(tmp_path_factory) -> Path:
    """A small random model with tied embeddings and a 262-token vocabulary (tests/gguf_files.py), converted to a
    Meta checkpoint and exported as a Q4_0 GGUF file: quick to export and to read back, unlike Llama 3's
    vocabulary."""
    from gguf_files import write_gguf

    from llama.gguf_export import export_gguf
    from llama.gguf_import import convert_gguf

    tmp = tmp_path_factory.mktemp("small-q4_0")
    ckpt_dir = convert_gguf(write_gguf(tmp / "small.gguf"), tmp / "meta")
    return export_gguf(ckpt_dir, tmp / "small-q4_0.gguf", "q4_0")
