"""Checkpoints of Llama's published shapes with random weights: Meta's shapes and layout, written once, seeded."""

import pytest
import torch
from checkpoints import TINY_PARAMS
from llama_models.sku_list import resolve_model

import llama.shapes
from llama.checkpoint import ShardedCheckpoint, read_params
from llama.generation import Llama
from llama.model import ModelArgs
from llama.shapes import SHAPES, Shape, shape_checkpoint, write_random_checkpoint

META_MODELS = {"llama3.2-1b": "Llama3.2-1B", "llama3.2-3b": "Llama3.2-3B", "llama3.1-8b": "Llama3.1-8B"}


def test_the_shapes_are_metas():
    assert list(SHAPES) == list(META_MODELS)
    for name, model in META_MODELS.items():
        assert SHAPES[name].params == resolve_model(model).arch_args, name
    assert [name for name, shape in SHAPES.items() if shape.tied] == ["llama3.2-1b", "llama3.2-3b"]


def test_a_shape_is_written_once_as_meta_lays_it_out_and_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(SHAPES, "tiny", Shape(TINY_PARAMS, tied=True))
    ckpt = shape_checkpoint("tiny", cache_dir=tmp_path)
    assert ckpt == tmp_path / "shapes" / "tiny" and (ckpt / "checklist.chk").is_file()
    assert read_params(ckpt) == TINY_PARAMS
    checkpoint = ShardedCheckpoint(ckpt, ModelArgs(**TINY_PARAMS))
    shard = checkpoint.shards[0]
    # As in Meta's Llama 3.2 files: output.weight is stored, as the embedding's own storage (written once).
    assert not checkpoint.output_absent and checkpoint.tied_output
    embedding, output = shard["tok_embeddings.weight"], shard["output.weight"]
    assert output.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()
    stored = sum(t.nbytes for key, t in shard.items() if key != "output.weight")
    assert stored < checkpoint.paths[0].stat().st_size < stored + (1 << 20)
    assert {t.dtype for t in shard.values()} == {torch.bfloat16}
    assert abs(shard["layers.1.feed_forward.w2.weight"].float().std().item() - 0.02) < 0.001
    assert torch.equal(shard["norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    generator = Llama.build(ckpt, max_seq_len=16, max_batch_size=1, device="cpu")
    generator.tokenizer.stop_tokens = set()
    assert [len(tokens) for tokens in generator.generate([[1, 2, 3]], 4, temperature=0)[0]] == [4]

    written = checkpoint.paths[0].stat().st_mtime_ns
    monkeypatch.setattr(llama.shapes, "write_random_checkpoint", lambda *a, **k: pytest.fail("written again"))
    assert shape_checkpoint("tiny", cache_dir=tmp_path) == ckpt
    assert checkpoint.paths[0].stat().st_mtime_ns == written


def test_the_weights_depend_on_the_seed_alone(tmp_path):
    first = write_random_checkpoint(tmp_path / "first", TINY_PARAMS, tied=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = write_random_checkpoint(tmp_path / "again", TINY_PARAMS, tied=False)
    finally:
        torch.set_num_threads(threads)
    other = write_random_checkpoint(tmp_path / "other", TINY_PARAMS, tied=False, seed=1)
    checklists = [(path / "checklist.chk").read_text() for path in (first, again, other)]
    assert checklists[0] == checklists[1] != checklists[2]
    assert not ShardedCheckpoint(first, ModelArgs(**TINY_PARAMS)).tied_output


def test_an_unknown_shape_names_the_shapes():
    with pytest.raises(ValueError, match=r"unknown --shape 'llama3-1b': use one of llama3.2-1b, llama3.2-3b, llama3.1-8b$"):
        shape_checkpoint("llama3-1b")
