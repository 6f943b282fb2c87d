"""Distributed faults end the whole job quickly, non-zero, with the failing rank's error shown."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import TINY_PARAMS, random_state_dict, write_checkpoint

TESTS = Path(__file__).parent
ROOT = TESTS.parent
PARAMS = {**TINY_PARAMS, "n_kv_heads": 4}


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("mp2"), PARAMS, random_state_dict(PARAMS), 2, torch.float32)


def launch(*args) -> tuple:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start


@pytest.mark.parametrize("how,shown", [("raise", "rank 1 failed on purpose"), ("exit", "exitcode  : 7")])
def test_a_rank_failing_mid_generation_ends_the_job(two_shards, how, shown):
    returncode, output, seconds = launch(TESTS / "failing_rank.py", two_shards, how)
    assert returncode != 0 and shown in output
    assert seconds < 120


def test_a_shard_that_fails_to_load_ends_the_job(two_shards, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in two_shards.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "consolidated.01.pth").write_bytes(b"not a checkpoint")
    returncode, output, seconds = launch(ROOT / "example_text_completion.py", "--ckpt_dir", broken)
    assert returncode != 0 and "error: cannot load" in output and "consolidated.01.pth" in output
    assert seconds < 120
