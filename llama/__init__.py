"""Llama 3 inference: Meta's checkpoints on any number of processes, CPU or GPU."""

from .generation import Llama
from .model import ModelArgs, Transformer
from .chat_format import ChatFormat, Dialog
from .tokenizer import Tokenizer

__all__ = ["ChatFormat", "Dialog", "Llama", "ModelArgs", "Tokenizer", "Transformer"]
