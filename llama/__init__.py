"""Llama 3 inference: Meta's checkpoints on any number of processes, CPU or GPU."""

import os

# torch puts CPU allocations of 2 MB or more in transparent huge pages if this is set when it first allocates
# (so only where this package is imported before torch): fewer TLB misses. THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .generation import Llama
from .model import ModelArgs, Transformer
from .chat_format import ChatFormat, Dialog
from .tokenizer import Tokenizer

__all__ = ["ChatFormat", "Dialog", "Llama", "ModelArgs", "Tokenizer", "Transformer"]
