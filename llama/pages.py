"""Advice to the kernel on the memory pages of a tensor (Linux)."""

import ctypes
import mmap
import sys
from typing import Tuple

import torch

_libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _span(tensor: torch.Tensor) -> Tuple[int, int]:
    """The [begin, end) addresses of the bytes `tensor` spans."""
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + (last + 1) * tensor.element_size()


def _advise(tensor: torch.Tensor, advice: str) -> None:
    """madvise(mmap.<advice>) on the pages that lie wholly inside `tensor`'s span (Linux only)."""
    if _libc is None or tensor.numel() == 0 or tensor.device.type != "cpu":
        return
    first, last = _span(tensor)
    begin = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE
    end = last // mmap.PAGESIZE * mmap.PAGESIZE
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


def file_mapped(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lies in a private mapping of a file (Linux), as a memory-mapped checkpoint shard's tensors
    do: `release_pages` on it only drops pages that read back from the file, so it stays usable."""
    if not sys.platform.startswith("linux") or tensor.numel() == 0 or tensor.device.type != "cpu":
        return False
    begin, end = _span(tensor)
    with open("/proc/self/maps") as f:
        for line in f:  # begin-end perms offset device inode [path]
            fields = line.split()
            low, high = (int(address, 16) for address in fields[0].split("-"))
            if low <= begin < high:
                return end <= high and fields[1].endswith("p") and fields[4] != "0" and len(fields) > 5
    return False
