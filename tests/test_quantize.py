"""Weight-only int8 and prepacked weights: close to the plain model, with Meta's layer layout."""

import json
import subprocess

import pytest
import torch
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

from checkpoints import TINY_PARAMS, write_checkpoint

from llama import Llama
from llama import generation, kernels, optimize, quantized_linear
from llama.kernels import DirectLinear, HalfPackedLinear, PackedLinear
from llama.checkpoint import CheckpointError
from llama.hf import export_hf
from llama.pages import file_mapped
from llama.eval import perplexity
from llama.quantize import write_quantized
from llama.quantized_linear import int8_linear, quantize_model, quantize_weight, quantize_weight_int4


def test_quantized_weight_round_trips_within_half_a_step():
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_int8_kernel_and_dequantized_paths_agree():
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_weight(weight)
    x = torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
    reference = x.float() @ (q.float() * scale[:, None]).T
    kernel = int8_linear(x, q, scale.bfloat16())  # 2 rows: torch's int8 kernel
    dense = int8_linear(x.expand(4, 2, 32), q, scale.bfloat16())  # 8 rows: dequantized weight
    assert kernel.shape == (1, 2, 48) and dense.shape == (4, 2, 48)
    torch.testing.assert_close(kernel.float(), reference, atol=0.1, rtol=0.02)
    torch.testing.assert_close(dense[0].float(), reference[0], atol=0.1, rtol=0.02)


def test_int4_weight_is_within_half_a_step():
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(4))
    packed, scales_and_offsets = quantize_weight_int4(weight, 32)
    assert scales_and_offsets.shape == (2, 96, 2)  # (groups, out, scale and offset)
    # the weight the kernel computes with, read back through the identity
    used = torch._weight_int4pack_mm_for_cpu(torch.eye(64).bfloat16(), packed, 32, scales_and_offsets).float().T
    step = scales_and_offsets[..., 0].float().repeat_interleave(32, dim=0).T  # (out, in)
    assert ((used - weight).abs() <= step / 2 + 0.01 * weight.abs() + 1e-3).all()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
    out = torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_offsets)
    torch.testing.assert_close(out.float(), x.float() @ used.T, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_in_row_blocks_is_exact(monkeypatch, dtype):
    """Blocks of rows (int4: of whole packing groups) quantize as the whole weight at once, source untouched."""
    weight = torch.randn(1000 - 8, 128, generator=torch.Generator().manual_seed(7)).to(dtype)
    source = weight.clone()
    row_max = weight.float().abs().amax(dim=1) * 1.5  # a shard's rows, longer elsewhere
    whole = [quantize_weight(weight), quantize_weight(weight, row_max), quantize_weight_int4(weight, 32)]
    scale = weight.float().abs().amax(dim=1) / 127
    assert torch.equal(whole[0][0], torch.round(weight.float() / scale[:, None]).to(torch.int8))
    monkeypatch.setattr(quantized_linear, "QUANTIZE_BLOCK_BYTES", 64 * 128 * 4)  # 64-row blocks
    released = []
    blocked = [quantize_weight(weight, release=released.append), quantize_weight(weight, row_max)]
    blocked.append(quantize_weight_int4(weight, 32))
    assert [len(block) for block in released] == [64] * 15 + [32]
    for expected, got in zip(whole, blocked):
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert torch.equal(weight, source)


@pytest.mark.parametrize("tied, method", [(True, "int8"), (False, "int4")])
def test_quantizing_as_blocks_load_gives_the_quantized_loaded_model(
    tmp_path, monkeypatch, tokenizer, tiny_state, tiny_ckpt, tied, method
):
    """Llama.build quantizes each block as it loads and releases its sources: the same tensors as quantizing the
    whole model once loaded, from a tied bfloat16 checkpoint used in place (its embedding's pages released
    after quantizing the output from them) or a float32 one converted."""
    monkeypatch.setattr(generation, "Tokenizer", lambda path: tokenizer)  # built once
    ckpt = tiny_ckpt
    if tied:
        state = {key: tensor for key, tensor in tiny_state.items() if key != "output.weight"}
        ckpt = write_checkpoint(tmp_path / "tied", TINY_PARAMS, state, 1, torch.bfloat16)
    build = dict(max_seq_len=16, max_batch_size=1, dtype="bfloat16")
    quantized = Llama.build(ckpt, quantize=method, **build).model
    assert file_mapped(quantized.tok_embeddings.weight) == tied
    loaded = quantized.state_dict()
    model = Llama.build(ckpt, prepack=False, **build).model
    quantize_model(model, method)
    expected = model.state_dict()
    assert list(loaded) == list(expected)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_int4_model_tracks_the_float_model(tiny_ckpt, tokenizer):
    exact = Llama.build(tiny_ckpt, max_seq_len=64, max_batch_size=2, dtype="bfloat16")
    quantized = Llama.build(tiny_ckpt, max_seq_len=64, max_batch_size=2, dtype="bfloat16", quantize="int4")
    assert quantized.model.layers[0].feed_forward.w13.weight.dtype == torch.uint8
    tokens = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4, bos=True, eos=False)])
    logits, q_logits = exact.model.forward(tokens, 0), quantized.model.forward(tokens, 0)
    assert torch.nn.functional.cosine_similarity(logits.flatten(), q_logits.flatten(), dim=0) > 0.98
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        Llama.build(tiny_ckpt, max_seq_len=64, max_batch_size=2, quantize="int3")


def test_int8_model_is_close_to_float(tiny_ckpt, tokenizer):
    exact = Llama.build(tiny_ckpt, max_seq_len=64, max_batch_size=2, dtype="float32")
    quantized = Llama.build(tiny_ckpt, max_seq_len=64, max_batch_size=2, dtype="float32", quantize="int8")
    attention = quantized.model.layers[0].attention
    assert isinstance(attention.wqkv, ColumnParallelLinear) and isinstance(attention.wo, RowParallelLinear)
    assert attention.wqkv.weight.dtype == torch.int8 and "layers.0.attention.wqkv.scale" in quantized.model.state_dict()

    tokens = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4, bos=True, eos=False)
    logits, q_logits = exact.model.forward(torch.tensor([tokens]), 0), quantized.model.forward(torch.tensor([tokens]), 0)
    assert (q_logits - logits).abs().max() < 0.05 * logits.abs().max()
    exact_ppl, quantized_ppl = perplexity(exact.model, tokens, 16), perplexity(quantized.model, tokens, 16)
    assert abs(quantized_ppl / exact_ppl - 1) < 0.01


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_compiled_quantized_decoding_tracks_eager(tiny_ckpt, method):
    """Compiled decode steps of a quantized model (inductor's autotuned kernels) give the eager model's logits
    within bfloat16 rounding."""
    build = dict(max_seq_len=32, max_batch_size=1, dtype="bfloat16", quantize=method)
    compiled, eager = Llama.build(tiny_ckpt, compile=True, **build), Llama.build(tiny_ckpt, **build)
    tokens = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(3))
    logits = {}
    for name, generator in (("compiled", compiled), ("eager", eager)):
        steps = [generator.model.forward(tokens[:, :8], 0)]
        steps += [generator.model.forward(tokens[:, pos : pos + 1], pos) for pos in range(8, 14)]
        logits[name] = torch.cat(steps, dim=1)
    scale = logits["eager"].abs().max()
    torch.testing.assert_close(logits["compiled"], logits["eager"], atol=0.03 * scale, rtol=0)


@pytest.mark.parametrize(
    "dtype, tolerance, kernel",
    [("float32", 1e-4, None), ("bfloat16", 0.02, None), ("bfloat16", 0.02, "direct"), ("bfloat16", 0.02, "half")],
)
def test_optimized_model_matches_plain(tiny_ckpt, monkeypatch, dtype, tolerance, kernel):
    """The default (inference-optimized) layers against Meta's plain ones: prepacked where this CPU can, else
    direct. As on CPUs without AVX512-BF16, "direct" forces the direct layers with float32 prefill, "half"
    fbgemm's float16 kernel."""
    if kernel is not None:
        monkeypatch.setattr(kernels, "needs_upcast", lambda dtype, device: True)
    if kernel == "direct":
        monkeypatch.setattr(optimize, "packing_for", lambda dtype, device: None)
    optimized = Llama.build(tiny_ckpt, max_seq_len=48, max_batch_size=2, dtype=dtype)
    plain = Llama.build(tiny_ckpt, max_seq_len=48, max_batch_size=2, dtype=dtype, prepack=False)
    expected_class = optimize.packing_for(getattr(torch, dtype), torch.device("cpu")) or DirectLinear
    if kernel == "half":
        assert expected_class is HalfPackedLinear
    optimized_layer, plain_layer = optimized.model.layers[0], plain.model.layers[0]
    for layer in (optimized_layer.feed_forward.w13, optimized_layer.attention.wqkv, optimized.model.output):
        assert isinstance(layer, expected_class)
    assert not isinstance(plain_layer.feed_forward.w1, (PackedLinear, DirectLinear)) and plain_layer.attention.wqkv is None
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(3))  # 80 rows: a prefill
    close = dict(atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(optimized.model.forward(tokens, 0), plain.model.forward(tokens, 0), **close)
    step = tokens[:, :1]
    torch.testing.assert_close(optimized.model.forward(step, 40), plain.model.forward(step, 40), **close)
    if dtype == "float32":  # the optimized path decodes exactly as the plain one
        prompts = tokens[:, :12].tolist()
        assert optimized.generate(prompts, 30, temperature=0)[0] == plain.generate(prompts, 30, temperature=0)[0]


def test_written_int8_checkpoint_is_the_quantized_model(tmp_path, tiny_ckpt):
    quantized = write_quantized(tiny_ckpt, tmp_path / "int8")
    assert json.loads((quantized / "quantization.json").read_text()) == {"method": "int8"}
    size = (quantized / "consolidated.00.pth").stat().st_size
    assert size < 0.7 * (tiny_ckpt / "consolidated.00.pth").stat().st_size  # int8 linear weights, float32 embedding
    subprocess.run(["md5sum", "--quiet", "-c", "checklist.chk"], cwd=quantized, check=True)
    loaded = Llama.build(quantized, max_seq_len=32, max_batch_size=2, dtype="float32")
    direct = Llama.build(tiny_ckpt, max_seq_len=32, max_batch_size=2, dtype="float32", quantize="int8")
    assert loaded.model.layers[0].attention.wqkv.weight.dtype == torch.int8
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(loaded.model.forward(tokens, 0), direct.model.forward(tokens, 0), rtol=0, atol=0)

    with pytest.raises(ValueError, match="is quantized as int8: leave quantize unset"):
        Llama.build(quantized, max_seq_len=32, max_batch_size=2, quantize="int4")
    with pytest.raises(CheckpointError, match="already quantized"):
        write_quantized(quantized, tmp_path / "again")
    with pytest.raises(CheckpointError, match="export the original checkpoint"):
        export_hf(str(quantized), str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="only int8 checkpoints can be written"):
        write_quantized(tiny_ckpt, tmp_path / "int4", method="int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]
