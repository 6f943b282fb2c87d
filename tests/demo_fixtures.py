"""The demo GGUF and its conversion, shared by the test modules that import these fixtures.

The conversion lands in one cache folder per test session; demo_checkpoint_dir returns at once when it is
already there, so modules that each import `demo_ckpt` still convert only once.
"""

from pathlib import Path
from typing import Iterable, List

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from llama.demo import demo_checkpoint_dir, demo_gguf_path


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "llama-cache"


@pytest.fixture(scope="session")
def demo_ckpt(demo_cache) -> Path:
    return demo_checkpoint_dir(demo_cache)


@pytest.fixture(scope="session")
def demo_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(demo_gguf_path())


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def hf_byte_level_bpe(tokens: List[str], merges: Iterable[str], digits: bool) -> HFTokenizer:
    """A Hugging Face byte-level BPE tokenizer from a GGUF-style vocabulary and merge list, with the
    SmolLM2/StarCoder pre-tokenizer (each digit alone, then GPT-2's split) if `digits`."""
    bpe = models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    tokenizer = HFTokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    steps = [pre_tokenizers.Digits(individual_digits=True), byte_level] if digits else [byte_level]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer
