"""The CPU kernels against torch's own products and attention."""

import pytest
import torch

from llama import Llama, kernels
from llama.optimize import optimize_for_inference


@pytest.mark.parametrize("positions", [1, 37, 600])
def test_decode_attention_is_torchs(positions):
    """The attention written out for compiled decode steps (query heads sharing a key/value head as its rows)
    equals torch's scaled_dot_product_attention."""
    gen = torch.Generator().manual_seed(positions)
    xq = torch.randn(2, 3, 4, 16, generator=gen)  # (bs, n_kv_heads, rows, head_dim)
    keys, values = torch.randn(2, 2, 3, positions, 16, generator=gen).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(xq, keys, values)
    torch.testing.assert_close(kernels.decode_attention(xq, keys, values), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start_pos", [0, 24])
def test_blocked_causal_attention_in_bfloat16_is_within_rounding_of_sdpa(monkeypatch, start_pos):
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK_ROWS", 16)
    gen = torch.Generator().manual_seed(0)
    xq = torch.randn(2, 37, 6, 32, generator=gen)  # (bs, seqlen, n_heads, head_dim)
    keys, values = torch.randn(2, 2, 2, start_pos + 37, 32, generator=gen)  # (bs, n_kv_heads, positions, head_dim)
    visible = torch.ones(37, start_pos + 37, dtype=torch.bool).tril(start_pos)
    expected = torch.nn.functional.scaled_dot_product_attention(
        xq.transpose(1, 2), keys, values, attn_mask=visible, enable_gqa=True
    ).transpose(1, 2)
    out = kernels.blocked_causal_attention(xq.bfloat16(), keys.bfloat16(), values.bfloat16(), start_pos)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, atol=0.03, rtol=0.02)


def test_blockwise_linear_is_f_linear_in_its_dtype(monkeypatch):
    monkeypatch.setattr(kernels, "PACK_BLOCK_BYTES", 1024)  # 4 rows of 64 float32 values per block
    x, weight = torch.randn(40, 64).bfloat16(), torch.randn(101, 64).bfloat16()
    out = kernels.blockwise_linear(x, weight, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (40, 101)
    torch.testing.assert_close(out, torch.nn.functional.linear(x.float(), weight.float()), atol=1e-5, rtol=1e-5)


def test_half_packed_kernel_computes_bfloat16_weights_in_float32(monkeypatch, tiny_ckpt):
    """fbgemm's float16 kernel (for CPUs without native bfloat16) multiplies bfloat16 weights exactly; weights
    beyond float16's range stay direct; compiled models and models for one sequence keep torch's kernel."""
    monkeypatch.setattr(kernels, "needs_upcast", lambda dtype, device: True)
    assert kernels.packing_for(torch.bfloat16, torch.device("cpu")) is kernels.HalfPackedLinear
    weight = (torch.randn(300, 64) * torch.logspace(-4, 1, 64)).bfloat16()  # magnitudes 1e-4 .. 10
    x = torch.randn(3, 5, 64).bfloat16()
    out = kernels.HalfPackedLinear.block_product(x, kernels.HalfPackedLinear.pack_block(weight))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 300)
    reference = torch.nn.functional.linear(x.float(), weight.float())
    torch.testing.assert_close(out.float(), reference.bfloat16().float(), atol=1e-5, rtol=0.008)
    assert not kernels.HalfPackedLinear.fits(torch.tensor([[1e5, 0.0]]).bfloat16())

    cases = [(2, False, kernels.HalfPackedLinear), (2, True, kernels.DirectLinear), (1, False, kernels.DirectLinear)]
    for batch, traceable, kind in cases:
        built = Llama.build(tiny_ckpt, max_seq_len=16, max_batch_size=batch, dtype="bfloat16", prepack=False)
        transformer = built.model
        transformer.layers[0].feed_forward.w2.weight.data[0, 0] = 1e5
        optimize_for_inference(transformer, traceable=traceable)
        assert isinstance(transformer.layers[0].attention.wqkv, kind)
        assert isinstance(transformer.layers[0].feed_forward.w2, kernels.DirectLinear)
