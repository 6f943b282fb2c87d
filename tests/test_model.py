"""Numerical parity of the model with transformers' LlamaForCausalLM on the same weights."""

import json

import pytest
import torch
from checkpoints import TINY_PARAMS, random_state_dict, write_checkpoint
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llama import Llama, ModelArgs, Transformer
from llama.checkpoint import read_params
from llama.parallel import init_model_parallel
from llama.hf import hf_config, meta_to_hf_state_dict
from llama import kernels, model
from llama.model import rope_frequencies

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a dragon who",
    "1, 2, 3,",
    "def fibonacci(n):",
]


def hf_model(state, params, max_seq_len=256) -> LlamaForCausalLM:
    args = ModelArgs(max_seq_len=max_seq_len, **params)
    model = LlamaForCausalLM(LlamaConfig(**hf_config(args)))
    model.load_state_dict(meta_to_hf_state_dict(state, args), strict=True)
    return model.float().eval()


def test_unknown_params_key_is_named():
    with pytest.raises(ValueError, match="unknown key.*moe_experts"):
        ModelArgs(max_seq_len=16, max_batch_size=1, moe_experts=8, **TINY_PARAMS)


def test_ffn_hidden_size_of_llama3_8b():
    args = ModelArgs(dim=4096, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024, vocab_size=128256)
    assert args.ffn_hidden_dim == 14336


@pytest.mark.parametrize("scaled", [False, True])
def test_rope_frequencies_match_transformers(scaled):
    params = dict(dim=4096, n_heads=32, n_kv_heads=8, rope_theta=500000.0, use_scaled_rope=scaled, vocab_size=128256)
    args = ModelArgs(max_seq_len=8192, **params)
    config = LlamaConfig(**hf_config(args))
    kind = "llama3" if scaled else "default"
    if kind == "default":
        expected = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    torch.testing.assert_close(rope_frequencies(args), expected.float(), rtol=1e-6, atol=0)


# Meta's params.json of Llama 3.2 1B and 3B (no RoPE factor: it is 32, as Hugging Face's config.json says) and
# of Llama 3.1 8B (factor 8).
META_PARAMS = {
    "3.2-1B": {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
               "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
    "3.2-3B": {"dim": 3072, "ffn_dim_multiplier": 1.0, "multiple_of": 256, "n_heads": 24, "n_kv_heads": 8,
               "n_layers": 28, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
    "3.1-8B": {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
               "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
}  # fmt: skip


@pytest.mark.parametrize("name, factor", [("3.2-1B", 32.0), ("3.2-3B", 32.0), ("3.1-8B", 8.0)])
def test_metas_params_json_gets_the_published_rope_factor(tmp_path, name, factor):
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS[name]))
    args = ModelArgs(**read_params(tmp_path))
    assert args.rope_scaling_factor == factor
    config = LlamaConfig(
        hidden_size=args.dim, num_attention_heads=args.n_heads, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )  # fmt: skip
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(rope_frequencies(args), expected.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "params, message",
    [({"rope_scaling_factor": 32.0}, "without use_scaled_rope"),
     ({"use_scaled_rope": True, "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 1.0}, "0 < low < high")],
)  # fmt: skip
def test_bad_rope_scaling_is_named(params, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**{**TINY_PARAMS, "use_scaled_rope": False, **params})


def test_metas_usage_matches_llama_models(tiny_ckpt):
    """Build, load_state_dict and forward(tokens, start_pos) straight away, as with Meta's Transformer."""
    from llama_models.llama3.args import ModelArgs as MetaArgs
    from llama_models.llama3.model import Transformer as MetaTransformer

    init_model_parallel(torch.device("cpu"))
    params = read_params(tiny_ckpt)
    state = torch.load(tiny_ckpt / "consolidated.00.pth", map_location="cpu", weights_only=True)
    ours, meta = Transformer(ModelArgs(max_seq_len=32, max_batch_size=2, **params)), MetaTransformer(
        MetaArgs(max_seq_len=32, max_batch_size=2, **params)
    )
    ours.load_state_dict(state)
    meta.load_state_dict(state)
    tokens = torch.randint(0, params["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = meta.forward(tokens, 0)
        torch.testing.assert_close(ours.forward(tokens, 0), expected, atol=1e-4, rtol=0)
        step = expected[:, -1:].argmax(dim=-1)  # (bs, 1)
        torch.testing.assert_close(ours.forward(step, 12), meta.forward(step, 12), atol=1e-4, rtol=0)
    assert ours.layers[0].attention.cache_k.dtype == torch.float32


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_scaled_rope": False, "n_kv_heads": 8}, {"n_kv_heads": 1, "rope_theta": 10000.0}],
    ids=["gqa-scaled", "mha", "mqa"],
)
@pytest.mark.parametrize("blocked", [False, True], ids=["flash", "blocked"])
def test_logits_match_transformers(tmp_path, monkeypatch, overrides, blocked):
    # prompts through the flash kernel, or through blocked_causal_attention in blocks of 16 queries
    monkeypatch.setattr(kernels, "attends_in_blocks", lambda dtype, device: blocked)
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK_ROWS", 16)
    params = {**TINY_PARAMS, **overrides}
    state = random_state_dict(params, seed=1)
    ckpt = write_checkpoint(tmp_path, params, state, dtype=torch.float32)
    ours = Llama.build(ckpt, max_seq_len=256, max_batch_size=2, dtype="float32", device="cpu")
    reference = hf_model(state, params)

    tokens = torch.randint(0, params["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, expected_one_token = reference(tokens).logits, reference(tokens[:1, :2]).logits
    torch.testing.assert_close(ours.model.forward(tokens, 0), expected, atol=1e-4, rtol=0)
    # The same positions through the KV cache: a 24-token prefill (causal), 6 more tokens over the cache (masked),
    # then one token at a time.
    incremental = [ours.model.forward(tokens[:, :24], 0), ours.model.forward(tokens[:, 24:30], 24)]
    incremental += [ours.model.forward(tokens[:, pos : pos + 1], pos) for pos in range(30, 40)]
    torch.testing.assert_close(torch.cat(incremental, dim=1), expected, atol=1e-4, rtol=0)
    one_token = [ours.model.forward(tokens[:1, pos : pos + 1], pos) for pos in range(2)]  # a one-token prompt
    torch.testing.assert_close(torch.cat(one_token, dim=1), expected_one_token, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(tiny_ckpt, tiny_state, tokenizer):
    ours = Llama.build(tiny_ckpt, max_seq_len=128, max_batch_size=len(PROMPTS), dtype="float32")
    reference = hf_model(tiny_state, TINY_PARAMS)
    prompt_tokens = [tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    max_gen_len = 24

    batched, _ = ours.generate(prompt_tokens, max_gen_len, temperature=0)
    for prompt, from_batch in zip(prompt_tokens, batched):
        alone, _ = ours.generate([prompt], max_gen_len, temperature=0)
        with torch.no_grad():
            hf_out = reference.generate(
                torch.tensor([prompt]), max_new_tokens=max_gen_len, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
        stop = next((i for i, t in enumerate(hf_out) if t in tokenizer.stop_tokens), len(hf_out))
        assert alone[0] == hf_out[:stop]
        assert from_batch == hf_out[:stop]
        assert len(from_batch) == max_gen_len or hf_out[stop] in tokenizer.stop_tokens


def test_logprobs_match_transformers(tiny_ckpt, tiny_state, tokenizer):
    ours = Llama.build(tiny_ckpt, max_seq_len=128, max_batch_size=2, dtype="float32")
    reference = hf_model(tiny_state, TINY_PARAMS)
    prompts = [tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:2]]
    tokens, logprobs = ours.generate(prompts, 8, temperature=0, logprobs=True, echo=True)
    for row, row_logprobs in zip(tokens, logprobs):
        with torch.no_grad():
            expected = torch.log_softmax(reference(torch.tensor([row])).logits[0, :-1], dim=-1)
        expected = expected.gather(-1, torch.tensor(row[1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(row_logprobs[1:]), expected, atol=1e-4, rtol=0)


def test_compiled_decoding_matches_transformers(tiny_ckpt, tiny_state, tokenizer, monkeypatch):
    """Compiled decode steps of one sequence (one graph for every position, a dynamic size) give transformers'
    logits and the eager model's greedy tokens; batches decode eagerly. The graph, whose oneDNN-packed weights
    stay inputs, goes through inductor's on-disk cache (stored or found) instead of bypassing it."""
    compiled = Llama.build(tiny_ckpt, max_seq_len=64, max_batch_size=2, dtype="float32", compile=True)
    reference = hf_model(tiny_state, TINY_PARAMS)
    tokens = torch.randint(0, TINY_PARAMS["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, expected_one_token = reference(tokens).logits, reference(tokens[:1, :2]).logits
    compiled_calls = []
    step = compiled.model.compiled_step
    monkeypatch.setattr(compiled.model, "compiled_step", lambda *args: compiled_calls.append(1) or step(*args))
    counters = torch._dynamo.utils.counters  # re-read below: compiling may replace its dicts
    graphs = counters["stats"]["unique_graphs"]
    cache_keys = ("fxgraph_cache_bypass", "fxgraph_cache_miss", "fxgraph_cache_hit")
    cache_before = [counters["inductor"][key] for key in cache_keys]
    for row in range(2):
        incremental = [compiled.model.forward(tokens[row : row + 1, :12], 0)]
        incremental += [compiled.model.forward(tokens[row : row + 1, pos : pos + 1], pos) for pos in range(12, 20)]
        torch.testing.assert_close(torch.cat(incremental, dim=1), expected[row : row + 1], atol=1e-4, rtol=0)
    one_token = [compiled.model.forward(tokens[:1, pos : pos + 1], pos) for pos in range(2)]  # a one-token prompt
    torch.testing.assert_close(torch.cat(one_token, dim=1), expected_one_token, atol=1e-4, rtol=0)
    assert len(compiled_calls) == 17  # the prompt at position 0 stays eager
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph for every position
    bypassed, missed, hit = (counters["inductor"][key] - before for key, before in zip(cache_keys, cache_before))
    assert (bypassed, missed + hit) == (0, 1)
    compiled.model.forward(tokens[:, :12], 0)
    batch_step = compiled.model.forward(tokens[:, 12:13], 12)
    torch.testing.assert_close(batch_step, expected[:, 12:13], atol=1e-4, rtol=0)
    assert len(compiled_calls) == 17

    eager = Llama.build(tiny_ckpt, max_seq_len=64, max_batch_size=2, dtype="float32")
    prompt = tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    assert compiled.generate([prompt], 16, temperature=0) == eager.generate([prompt], 16, temperature=0)


def test_one_bfloat16_sequence_decodes_through_torchs_own_kernel(tiny_ckpt, tiny_state, monkeypatch):
    """A bfloat16 model for one sequence keeps its weights plain: decode steps, eager and compiled, multiply single
    rows through torch's own matrix-vector kernel (kernels.matrix_vector, oneDNN off for each call only), and give
    transformers' bfloat16 logits within rounding."""
    original, vectors = kernels.matrix_vector, []
    monkeypatch.setattr(kernels, "matrix_vector", lambda row, weight: vectors.append(row.shape) or original(row, weight))
    build = dict(max_seq_len=32, max_batch_size=1, dtype="bfloat16")
    eager, compiled = Llama.build(tiny_ckpt, **build), Llama.build(tiny_ckpt, compile=True, **build)
    reference = hf_model(tiny_state, TINY_PARAMS).bfloat16()
    tokens = torch.randint(0, TINY_PARAMS["vocab_size"], (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(tokens).logits.float()
    for generator in (eager, compiled):
        layers = [generator.model.output, generator.model.layers[0].attention.wqkv]
        assert all(isinstance(layer, kernels.DirectLinear) for layer in layers)
        steps = [generator.model.forward(tokens[:, :8], 0)]
        steps += [generator.model.forward(tokens[:, pos : pos + 1], pos) for pos in range(8, 14)]
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=0.03 * expected.abs().max(), rtol=0)
        assert torch.backends.mkldnn.enabled
    assert len(vectors) == 6 * (4 * TINY_PARAMS["n_layers"] + 1)  # eager steps (compiled ones call an operator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_metas_bit_for_bit(dtype):
    from llama_models.llama3.model import RMSNorm as MetaRMSNorm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 576, generator=gen) * torch.rand(576, generator=gen) * 8).to(dtype)
    ours, meta = model.RMSNorm(576, eps=1e-5), MetaRMSNorm(576, eps=1e-5)
    weight = torch.randn(576, generator=gen).to(dtype)
    ours.weight.data, meta.weight.data = weight, weight.clone()
    with torch.no_grad():
        assert torch.equal(ours(x), meta(x))
