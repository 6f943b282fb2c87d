import os
import subprocess
import sys

import torch

from llama import Llama
from llama.pages import file_mapped, keep_pages_small, release_pages


def vm_flags(address: int) -> list:
    """The VmFlags of this process's mapping that holds `address`."""
    mapping = None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: begin-end perms offset dev ...
                begin, end = (int(x, 16) for x in fields[0].split("-"))
                mapping = begin <= address < end
            elif mapping and line.startswith("VmFlags:"):
                return fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_importing_llama_asks_torch_for_huge_pages_unless_told_otherwise():
    code = "import llama, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "1\n"
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "0\n"


def test_keep_pages_small_marks_the_tensors_pages():
    cache = torch.empty(16 << 20, dtype=torch.uint8)  # large enough for a mapping of its own
    assert "nh" not in vm_flags(cache.data_ptr() + (8 << 20))
    keep_pages_small(cache)
    assert "nh" in vm_flags(cache.data_ptr() + (8 << 20))


def test_release_pages_drops_the_contents():
    weights = torch.ones(16 << 20, dtype=torch.uint8)
    release_pages(weights[4096:-4096])
    middle = weights[(4 << 20) : (12 << 20)]
    assert middle.sum() == 0  # anonymous memory reads back as zeros
    assert weights[:4096].all() and weights[-4096:].all()  # pages only partly inside are kept


def test_file_mapped_tells_a_checkpoints_pages_from_other_memory(tmp_path):
    values = torch.arange(1 << 20, dtype=torch.float32)
    torch.save({"weight": values}, tmp_path / "shard.pth")
    mapped = torch.load(tmp_path / "shard.pth", mmap=True, weights_only=True)["weight"]
    assert file_mapped(mapped) and file_mapped(mapped[4096:])
    assert not file_mapped(mapped.clone()) and not file_mapped(values) and not file_mapped(values[:0])
    release_pages(mapped)
    assert torch.equal(mapped, values)  # read back from the file


def test_kv_caches_stay_in_small_pages(tiny_ckpt):
    # 2 key/value heads of 8 dims: 4 x 2 x 16384 x 8 float32 = 4 MB per cache
    model = Llama.build(tiny_ckpt, max_seq_len=16384, max_batch_size=4, dtype="float32", device="cpu").model
    cache = model.layers[0].attention.cache_k
    assert cache.numel() * cache.element_size() >= 4 << 20
    assert "nh" in vm_flags(cache.data_ptr() + cache.numel() * cache.element_size() // 2)
