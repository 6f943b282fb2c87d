"""Advice to the kernel on the memory pages of a tensor (Linux)."""

import ctypes
import mmap
import sys

import torch

_libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _advise(tensor: torch.Tensor, advice: str) -> None:
    """madvise(mmap.<advice>) on the pages that lie wholly inside `tensor`'s span (Linux only)."""
    if _libc is None or tensor.numel() == 0 or tensor.device.type != "cpu":
        return
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    begin = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (tensor.data_ptr() + (last + 1) * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > begin:
        _libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), getattr(mmap, advice))


def release_pages(tensor: torch.Tensor) -> None:
    """Let the kernel drop the resident pages that lie wholly inside `tensor`'s span (Linux only): memory-mapped
    shard pages read back from the file if touched again (shards are mapped privately and never written), while
    other memory reads back as zeros, so use it only on tensors nothing needs any more.
    """
    _advise(tensor, "MADV_DONTNEED")


def keep_pages_small(tensor: torch.Tensor) -> None:
    """Keep `tensor`'s pages out of huge pages (Linux only), so that touching a few bytes of an uninitialized
    tensor (a KV cache) makes 4 KB resident, not 2 MB."""
    _advise(tensor, "MADV_NOHUGEPAGE")
