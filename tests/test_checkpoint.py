"""Loading any shard count into any number of processes, resharding, and checkpoint errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoints import TINY_PARAMS, kill_once_writing, random_state_dict, write_checkpoint
from servers import free_port

from llama import Llama
from llama.checkpoint import CheckpointError, ShardedCheckpoint
from llama.model import ModelArgs
from llama.quantize import write_quantized
from llama.reshard import reshard

TESTS = Path(__file__).parent
ROOT = TESTS.parent
KV4_PARAMS = {**TINY_PARAMS, "n_kv_heads": 4}


def greedy_tokens(ckpt_dir: Path, out: Path, nproc: int = 1, quantize: str = "") -> list:
    """Run tests/greedy_tokens.py in `nproc` processes (torchrun for more than one) and return its tokens."""
    script = [str(TESTS / "greedy_tokens.py"), str(ckpt_dir), str(out), quantize]
    if nproc == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """float32 checkpoints of two random models (2 and 4 key/value heads) with 1, 2 and 4 shards."""
    root = tmp_path_factory.mktemp("ckpts")
    made = {}
    for name, params in (("kv2", TINY_PARAMS), ("kv4", KV4_PARAMS)):
        state = random_state_dict(params, seed=3)
        for shards in (1, 2, 4):
            made[name, shards] = write_checkpoint(root / f"{name}-mp{shards}", params, state, shards, torch.float32)
    return made


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory):
    """Greedy tokens of each model from its one-shard checkpoint in one process."""
    out = tmp_path_factory.mktemp("ref")
    return {name: greedy_tokens(checkpoints[name, 1], out / f"{name}.json") for name in ("kv2", "kv4")}


@pytest.mark.parametrize(
    "model,shards,nproc",
    [("kv2", 1, 2), ("kv2", 2, 1), ("kv2", 2, 2), ("kv4", 4, 2), ("kv4", 2, 4), ("kv2", 1, 4)],
    ids=["1to2", "2to1", "2to2", "4to2", "2to4", "1to4-replicated-kv"],
)
def test_any_shard_count_on_any_process_count(checkpoints, reference, tmp_path, model, shards, nproc):
    assert greedy_tokens(checkpoints[model, shards], tmp_path / "out.json", nproc) == reference[model]


@pytest.mark.parametrize("shards, nproc", [(2, 1), (2, 2), (1, 4)], ids=["2to1", "2to2", "1to4"])
def test_quantized_checkpoint_loads_on_any_process_count(checkpoints, tmp_path, shards, nproc):
    """A checkpoint written as int8 decodes as quantizing the original at load does, resharded too (1->4
    replicates key/value heads and their scales)."""
    source = checkpoints["kv2", shards]
    quantized = write_quantized(source, tmp_path / "int8")
    expected = greedy_tokens(source, tmp_path / "expected.json", quantize="int8")
    assert greedy_tokens(quantized, tmp_path / "out.json", nproc) == expected


@pytest.fixture(scope="module")
def tied_checkpoints(tmp_path_factory):
    """The kv2 model with its output projection tied to the embedding, in two shards: output.weight left out, or
    stored equal to the embedding (as Meta's Llama 3.2 1B and 3B files do)."""
    root = tmp_path_factory.mktemp("tied")
    state = random_state_dict(TINY_PARAMS, seed=3)
    state["output.weight"] = state["tok_embeddings.weight"]
    without = {key: tensor for key, tensor in state.items() if key != "output.weight"}
    return {
        "absent": write_checkpoint(root / "absent", TINY_PARAMS, without, 2, torch.float32),
        "equal": write_checkpoint(root / "equal", TINY_PARAMS, state, 2, torch.float32),
    }


@pytest.mark.parametrize("nproc", [1, 2, 4], ids=["1proc", "2proc", "4proc-replicated-kv"])
def test_tied_output_is_the_embedding_held_once_on_any_process_count(tied_checkpoints, checkpoints, tmp_path, nproc):
    assert ShardedCheckpoint(tied_checkpoints["equal"], ModelArgs(**TINY_PARAMS)).tied_output
    assert not ShardedCheckpoint(checkpoints["kv2", 2], ModelArgs(**TINY_PARAMS)).tied_output
    expected = greedy_tokens(tied_checkpoints["equal"], tmp_path / "equal.json")
    assert (tmp_path / "equal.json.tied.0").read_text() == "1"
    assert greedy_tokens(tied_checkpoints["absent"], tmp_path / "absent.json", nproc) == expected
    assert [(tmp_path / f"absent.json.tied.{rank}").read_text() for rank in range(nproc)] == ["1"] * nproc
    assert expected != greedy_tokens(checkpoints["kv2", 2], tmp_path / "untied.json")  # the tie changes the model


def test_multi_node_launch(checkpoints, reference, tmp_path):
    """Two torchrun launchers, one process each, rendezvous on 127.0.0.1 as two nodes would."""
    port = free_port()
    launchers = []
    for node_rank in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
            str(TESTS / "greedy_tokens.py"), str(checkpoints["kv2", 2]), str(tmp_path / "out.json"),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        launchers.append(subprocess.Popen(command, cwd=ROOT, env=env))
    assert [p.wait(timeout=300) for p in launchers] == [0, 0]
    assert json.loads((tmp_path / "out.json").read_text()) == reference["kv2"]


@pytest.mark.parametrize("source,target", [(2, 1), (1, 2), (4, 2), (2, 4)])
def test_reshard_tool(checkpoints, reference, tmp_path, source, target):
    out = tmp_path / "resharded"
    subprocess.run(
        [sys.executable, "-m", "llama.reshard", "--ckpt_dir", str(checkpoints["kv4", source]),
         "--out_dir", str(out), "--model_parallel_size", str(target)],
        check=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    shard_names = [f"consolidated.{i:02d}.pth" for i in range(target)]
    assert names == sorted(["checklist.chk", "params.json", "tokenizer.model", *shard_names])
    subprocess.run(["md5sum", "--quiet", "-c", "checklist.chk"], cwd=out, check=True)
    # Meta's layout: shard i holds rows (or columns) i of each split weight, whole key/value heads.
    state = random_state_dict(KV4_PARAMS, seed=3)
    for i, name in enumerate(shard_names):
        shard = torch.load(out / name, weights_only=True)
        torch.testing.assert_close(shard["layers.1.attention.wk.weight"], state["layers.1.attention.wk.weight"].chunk(target)[i])
        torch.testing.assert_close(shard["layers.0.feed_forward.w2.weight"], state["layers.0.feed_forward.w2.weight"].chunk(target, 1)[i])
        torch.testing.assert_close(shard["norm.weight"], state["norm.weight"])
    assert greedy_tokens(out, tmp_path / "out.json", target) == reference["kv4"]


def test_reshard_refuses_more_shards_than_kv_heads(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="key/value heads"):
        reshard(str(checkpoints["kv2", 1]), str(tmp_path / "out"), 4)
    assert not (tmp_path / "out").exists()


def test_reshard_refuses_non_empty_out_dir(checkpoints, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="choose a new output directory"):
        reshard(str(checkpoints["kv2", 1]), str(tmp_path / "out"), 1)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_interrupted_reshard_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        reshard(str(checkpoints["kv2", 2]), str(tmp_path / "out"), 1)
    assert list(tmp_path.iterdir()) == []


def test_reshard_cli_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "llama.reshard", "--ckpt_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "o"),
         "--model_parallel_size", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_numbers_are_named(checkpoints, tmp_path):
    ckpt = copy_ckpt(checkpoints["kv4", 4], tmp_path / "c")
    (ckpt / "consolidated.02.pth").unlink()
    with pytest.raises(CheckpointError, match="lacks consolidated.02.pth"):
        Llama.build(ckpt, dtype="float32")


def test_no_shards(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(TINY_PARAMS))
    with pytest.raises(CheckpointError, match="no consolidated.NN.pth"):
        ShardedCheckpoint(tmp_path, ModelArgs(**TINY_PARAMS))


def test_missing_params_and_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Llama.build(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="params.json is missing"):
        Llama.build(tmp_path)


def test_shards_that_disagree(checkpoints, tmp_path):
    ckpt = copy_ckpt(checkpoints["kv4", 2], tmp_path / "c")
    shard = torch.load(ckpt / "consolidated.01.pth", weights_only=True)
    shard["layers.0.feed_forward.w1.weight"] = shard["layers.0.feed_forward.w1.weight"][:-32]
    torch.save(shard, ckpt / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="shards disagree on the shape of layers.0.feed_forward.w1.weight"):
        Llama.build(ckpt, dtype="float32")


def test_params_that_disagree_with_shards(checkpoints, tmp_path):
    ckpt = copy_ckpt(checkpoints["kv4", 1], tmp_path / "c")
    (ckpt / "params.json").write_text(json.dumps({**KV4_PARAMS, "n_kv_heads": 2}))
    with pytest.raises(CheckpointError, match="wk.weight is .* but params.json implies"):
        Llama.build(ckpt, dtype="float32")
    (ckpt / "params.json").write_text(json.dumps({**KV4_PARAMS, "n_layers": 3}))
    with pytest.raises(CheckpointError, match="missing layers.2"):
        Llama.build(ckpt, dtype="float32")


def test_vocab_that_disagrees_with_tokenizer(checkpoints, tmp_path):
    ckpt = copy_ckpt(checkpoints["kv4", 1], tmp_path / "c")
    (ckpt / "params.json").write_text(json.dumps({**KV4_PARAMS, "vocab_size": 32000}))
    with pytest.raises(CheckpointError, match="vocab_size 32000 but the tokenizer has 128256"):
        Llama.build(ckpt, dtype="float32")


def test_sizes_that_do_not_divide(checkpoints):
    checkpoint = ShardedCheckpoint(checkpoints["kv4", 2], ModelArgs(**KV4_PARAMS))
    with pytest.raises(CheckpointError, match="do not split over 3 processes"):
        checkpoint.read("layers.0.attention.wq.weight", 0, 3, torch.float32, torch.device("cpu"))


def test_unpickling_code_is_refused(tmp_path, checkpoints):
    ckpt = copy_ckpt(checkpoints["kv4", 1], tmp_path / "c")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"tok_embeddings.weight": Exploit()}, ckpt / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="cannot load .*consolidated.00.pth as plain tensors"):
        Llama.build(ckpt, dtype="float32")
    assert not marker.exists()


MEMORY_PROBE = textwrap.dedent(
    """
    import sys
    import llama.generation
    from llama import Llama
    from llama.tokenizer import Tokenizer, default_tokenizer_path
    tokenizer = Tokenizer(default_tokenizer_path())  # count the tokenizer's memory out of the baseline
    llama.generation.Tokenizer = lambda path: tokenizer
    def status_bytes(field):  # VmRSS now, VmHWM peak (ru_maxrss would include the parent's peak before exec)
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    before = status_bytes("VmRSS")
    dtype, quantize = sys.argv[2:4]
    Llama.build(sys.argv[1], max_seq_len=8, max_batch_size=1, dtype=dtype, device="cpu", quantize=quantize or None)
    print(status_bytes("VmHWM") - before)
    """
)


def peak_load_growth(ckpt: Path, dtype: str = "float32", quantize: str = "") -> float:
    """How much Llama.build of `ckpt` in a fresh process raises its peak RSS, over the checkpoint's bytes."""
    model_bytes = sum(p.stat().st_size for p in ckpt.glob("consolidated.*.pth"))
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(ckpt), dtype, quantize], cwd=ROOT, capture_output=True, text=True,
        check=True, timeout=300,
    )  # fmt: skip
    growth = int(result.stdout.strip().splitlines()[-1]) / model_bytes
    print(f"{dtype} {quantize}: peak RSS growth {growth:.2f}x the checkpoint's {model_bytes / 2**20:.0f} MiB")
    return growth


def test_loading_two_shards_into_one_process_peaks_near_model_size(tmp_path):
    params = {**TINY_PARAMS, "dim": 512, "n_layers": 4}
    ckpt = write_checkpoint(tmp_path / "c", params, random_state_dict(params), 2, torch.float32)
    assert peak_load_growth(ckpt) <= 1.25


def test_quantizing_at_load_never_holds_the_model_unquantized(tmp_path):
    """int8 weights quantized as each block loads, the memory-mapped sources released, a tied embedding (as in
    Llama 3.2 1B) released once the output is quantized from it: about 1.2x the checkpoint here (half of it the
    int8 weights, the rest a block's temporaries and code), where loading it all and then quantizing took 6.2x."""
    params = {**TINY_PARAMS, "dim": 256, "n_layers": 8}
    state = random_state_dict(params)
    del state["output.weight"]
    ckpt = write_checkpoint(tmp_path / "c", params, state, 1, torch.bfloat16)
    assert peak_load_growth(ckpt, "bfloat16", "int8") <= 1.5


def test_killed_reshard_leaves_the_previous_state(tmp_path):
    params = {**TINY_PARAMS, "dim": 256, "n_layers": 4}
    ckpt = write_checkpoint(tmp_path / "c", params, random_state_dict(params), 2, torch.float32)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "llama.reshard", "--ckpt_dir", str(ckpt), "--out_dir", str(out),
               "--model_parallel_size", "1"]  # fmt: skip
    kill_once_writing(command, out, ROOT)
    assert not out.exists()
    subprocess.run(command, cwd=ROOT, check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["md5sum", "--quiet", "-c", "checklist.chk"], cwd=out, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "out"]  # the killed run's staging is gone too
