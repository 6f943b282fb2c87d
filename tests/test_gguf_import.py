"""GGUF to Meta checkpoint: the demo model against transformers, and small random GGUFs in many quantizations."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from checkpoints import kill_once_writing
from demo_fixtures import demo_cache, demo_ckpt, demo_reader, field, hf_byte_level_bpe  # noqa: F401
from gguf_files import (
    CONTROL, DIM, FFN, HEADS, KV_HEADS, LAYERS, MERGES, SPECIAL, TOKENS, Q, gguf_metadata, random_tensors, write_gguf,
)
from tokenizers import AddedToken
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llama import Llama, ModelArgs
from llama.checkpoint import CheckpointError
from llama.demo import demo_gguf_path
from llama.gguf_import import convert_gguf
from llama.hf import interleaved_to_halves
from llama.model import rope_frequencies
from llama.tokenizer import Tokenizer

REPO = Path(__file__).parents[1]
# SmolLM2-135M-Instruct, as published.
SMOLLM2_CONFIG = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    hidden_act="silu",
)  # fmt: skip
HF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_down": "mlp.down_proj",
    "ffn_up": "mlp.up_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip
META_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}  # fmt: skip
DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
]


def dequantized(tensor) -> torch.Tensor:
    """gguf's own dequantization of a tensor, in (rows, columns) order."""
    shape = [int(n) for n in reversed(tensor.shape)]
    return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)).reshape(shape)


# --- the demo model against transformers ---


@pytest.fixture(scope="module")
def hf_demo(demo_reader):
    """LlamaForCausalLM with the demo GGUF's weights, dequantized by gguf and permuted to rotate-half order."""
    heads = {"attn_q": SMOLLM2_CONFIG["num_attention_heads"], "attn_k": SMOLLM2_CONFIG["num_key_value_heads"]}
    state = {}
    for tensor in demo_reader.tensors:
        weight = dequantized(tensor)
        parts = tensor.name.split(".")
        if parts[0] == "blk":
            if parts[2] in heads:
                weight = interleaved_to_halves(weight, heads[parts[2]])
            state[f"model.layers.{parts[1]}.{HF_LAYER_NAMES[parts[2]]}.weight"] = weight
        else:
            state[{"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight"}[parts[0]]] = weight
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG))
    model.load_state_dict(state, strict=True)
    return model.float().eval()


@pytest.fixture(scope="module")
def hf_chat_tokenizer(demo_reader):
    """A transformers tokenizer from the GGUF vocabulary, merges, control tokens and chat template."""
    tokens, types = list(field(demo_reader, "tokenizer.ggml.tokens")), field(demo_reader, "tokenizer.ggml.token_type")
    backend = hf_byte_level_bpe(tokens, field(demo_reader, "tokenizer.ggml.merges"), digits=True)
    backend.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types) if kind == CONTROL])
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=field(demo_reader, "tokenizer.chat_template"))


@pytest.fixture(scope="module")
def ours(demo_ckpt):
    return Llama.build(demo_ckpt, max_seq_len=256, max_batch_size=2, dtype="float32", device="cpu")


def test_demo_params_and_spec(demo_ckpt, ours):
    params = json.loads((demo_ckpt / "params.json").read_text())
    args = ModelArgs(**params)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == (576, 30, 9, 3, 49152)
    assert (args.ffn_hidden_dim, args.norm_eps, args.rope_theta, args.use_scaled_rope) == (1536, 1e-5, 100000.0, False)
    tokenizer = ours.tokenizer
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.stop_tokens) == (None, 2, 2, {0, 2})
    assert tokenizer.spec.chat_format == "chatml"
    assert tokenizer.spec.default_system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_demo_chat_prompt_is_the_gguf_templates(ours, hf_chat_tokenizer):
    for dialog in DIALOGS:
        expected = hf_chat_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, return_dict=True)
        assert ours.formatter.encode_dialog_prompt(dialog) == list(expected["input_ids"])


def test_demo_logits_match_transformers(demo_ckpt, ours, hf_demo):
    prompt = ours.formatter.encode_dialog_prompt(DIALOGS[0])
    tokens = torch.tensor([prompt, prompt[::-1]])
    with torch.no_grad():
        expected = hf_demo(tokens).logits
        exact = copy.deepcopy(hf_demo).double()(tokens).logits
    plain = Llama.build(demo_ckpt, max_seq_len=256, max_batch_size=2, dtype="float32", device="cpu", prepack=False)
    torch.testing.assert_close(plain.model.forward(tokens, 0), expected, atol=1e-4, rtol=0)
    # Prepacked weights round differently; they stay about as close to the float64 result as transformers is.
    transformers_error = (expected.double() - exact).abs().max()
    assert (ours.model.forward(tokens, 0).double() - exact).abs().max() <= max(1.5 * transformers_error, 1e-4)


def test_demo_greedy_chat_matches_transformers(ours, hf_demo):
    max_gen_len = 16
    prompts = [ours.formatter.encode_dialog_prompt(dialog) for dialog in DIALOGS]
    batch, _ = ours.generate(prompts, max_gen_len, temperature=0)
    for prompt, mine in zip(prompts, batch):
        with torch.no_grad():
            theirs = hf_demo.generate(
                torch.tensor([prompt]), max_new_tokens=max_gen_len, do_sample=False, eos_token_id=[2, 0], pad_token_id=2
            )[0, len(prompt) :].tolist()
        assert mine == [t for t in theirs if t not in (0, 2)] and len(mine) > 3
    assert "Paris" in ours.tokenizer.decode(batch[0])


# --- small random GGUFs ---

# Relative RMS error of each quantization on Gaussian weights, with headroom; None: gguf cannot quantize it,
# so the file holds random blocks.
QUANT_ERROR = {
    Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.01, Q.Q5_0: 0.1, Q.Q5_1: 0.1, Q.Q4_0: 0.2, Q.Q4_1: 0.2,
    Q.Q6_K: None, Q.Q4_K: None,
}  # fmt: skip


def meta_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{META_LAYER_NAMES[parts[2]]}.weight"
    return {"token_embd": "tok_embeddings.weight", "output_norm": "norm.weight", "output": "output.weight"}[parts[0]]


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "consolidated.00.pth", weights_only=True)


@pytest.mark.parametrize("qtype", list(QUANT_ERROR), ids=lambda q: q.name)
def test_quantized_weights_are_ggufs_dequantization(tmp_path, qtype):
    original = random_tensors()
    path = write_gguf(tmp_path / "m.gguf", qtype, tensors=original)
    ckpt = convert_gguf(path, tmp_path / "out")
    state = load_state(ckpt)
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert {t.tensor_type for name, t in stored.items() if "norm" not in name} == {qtype}
    assert set(state) == {meta_name(n) for n in original} | {"output.weight"}
    for name, values in original.items():
        weight = state[meta_name(name)]
        assert torch.equal(weight, dequantized(stored[name])) and weight.isfinite().all() and weight.std() > 0, name
        if QUANT_ERROR[qtype] is not None:
            error = (weight - torch.from_numpy(values)).norm() / np.linalg.norm(values)
            assert error <= QUANT_ERROR[qtype], (name, float(error))
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])  # tied
    params = json.loads((ckpt / "params.json").read_text())
    args = ModelArgs(**params)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == (DIM, LAYERS, HEADS, KV_HEADS, len(TOKENS))
    assert (args.ffn_hidden_dim, args.norm_eps, args.rope_theta, args.use_scaled_rope) == (FFN, 1e-5, 500000.0, False)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "params.json", "tokenizer.model", "tokenizer_spec.json",
    ]  # fmt: skip


def test_untied_output_and_odd_ffn_size_load_and_run(tmp_path):
    ffn = 320  # not a multiple of 256: needs an ffn_dim_multiplier
    tensors = random_tensors(ffn=ffn, tied=False, seed=1)
    path = write_gguf(tmp_path / "m.gguf", Q.Q8_0, metadata=gguf_metadata(ffn=ffn), tensors=tensors)
    ckpt = convert_gguf(path, tmp_path / "out", dtype="bfloat16")
    state = load_state(ckpt)
    assert state["output.weight"].dtype == torch.bfloat16
    assert not torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert torch.equal(state["output.weight"], dequantized(stored["output.weight"]).bfloat16())
    assert ModelArgs(**json.loads((ckpt / "params.json").read_text())).ffn_hidden_dim == ffn
    generator = Llama.build(ckpt, max_seq_len=32, max_batch_size=1, dtype="float32", device="cpu")
    assert generator.model.forward(torch.tensor([[5, 6, 7]]), 0).shape == (1, 3, len(TOKENS))


def test_tokenizer_spec_and_encoding_match_hf(tmp_path):
    ckpt = convert_gguf(write_gguf(tmp_path / "m.gguf"), tmp_path / "out")
    tokenizer = Tokenizer(str(ckpt / "tokenizer.model"))
    spec = tokenizer.spec
    assert (spec.bos_token, spec.eos_token, spec.pad_token, spec.chat_format) == (None, "<|im_end|>", "<|im_end|>", "chatml")
    assert spec.stop_tokens == ["<|im_end|>", "<|endoftext|>"] and spec.special_tokens == {t: i for i, t in enumerate(SPECIAL)}
    assert spec.default_system_prompt is None  # the template inserts no system message
    text = "the theme: 2024 then <|im_end|> the\n\n  the"
    hf = hf_byte_level_bpe(TOKENS, MERGES, digits=True)
    assert tokenizer.encode(text, bos=True, eos=False) == hf.encode(text).ids
    assert TOKENS.index("Ġthe") in tokenizer.encode(text, bos=False, eos=False)


LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_scaled_frequencies(**scaling) -> torch.Tensor:
    """transformers' llama3-type RoPE frequencies for this file's head size, Llama 3.1's scaling by default."""
    config = LlamaConfig(
        hidden_size=DIM, num_attention_heads=HEADS, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", **LLAMA31_SCALING, **scaling},
    )
    return ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].float()


def llama31_rope_factors(**scaling) -> np.ndarray:
    """Each frequency's divisor under Llama 3.1 scaling (or another llama3-type one), from transformers."""
    head_dim = DIM // HEADS
    base = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return (base / llama3_scaled_frequencies(**scaling)).float().numpy()


@pytest.mark.parametrize(
    "scaling",
    [{"factor": 32.0}, {"factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0}],
    ids=["llama3.2", "other-wavelengths"],
)
def test_llama3_type_rope_factors_carry_their_scaling(tmp_path, scaling):
    tensors = {**random_tensors(), "rope_freqs.weight": llama31_rope_factors(**scaling)}
    ckpt = convert_gguf(write_gguf(tmp_path / "m.gguf", tensors=tensors), tmp_path / "out")
    params = json.loads((ckpt / "params.json").read_text())
    assert (params["use_scaled_rope"], params["rope_scaling_factor"]) == (True, scaling["factor"])
    torch.testing.assert_close(rope_frequencies(ModelArgs(**params)), llama3_scaled_frequencies(**scaling), rtol=1e-5, atol=0)


def test_llama31_rope_factors_set_use_scaled_rope(tmp_path):
    factors = llama31_rope_factors()
    assert factors.max() > 7 and factors.min() == 1
    tensors = {**random_tensors(), "rope_freqs.weight": factors}
    ckpt = convert_gguf(write_gguf(tmp_path / "m.gguf", tensors=tensors), tmp_path / "out")
    assert json.loads((ckpt / "params.json").read_text())["use_scaled_rope"] is True
    assert "rope_freqs.weight" not in load_state(ckpt)


def corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])


def drop(key: str):
    return lambda path: write_gguf(path, metadata={k: v for k, v in gguf_metadata().items() if k != key})


def override(key: str, value):
    return lambda path: write_gguf(path, metadata={**gguf_metadata(), key: value})


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: write_gguf(p, arch="qwen2"), "holds a 'qwen2' model: only the 'llama' architecture"),
        (drop("llama.attention.head_count_kv"), "lacks the metadata key 'llama.attention.head_count_kv'"),
        (drop("tokenizer.ggml.pre"), "lacks the metadata key 'tokenizer.ggml.pre'"),
        (lambda p: corrupt(write_gguf(p)), "truncated"),
        (override("tokenizer.ggml.model", "llama"), "has a 'llama' tokenizer: only byte-level BPE"),
        (override("tokenizer.ggml.pre", "qwen2"), "pre-tokenizer 'qwen2' is not supported"),
        (override("llama.rope.dimension_count", 32), "rope.dimension_count 32 but heads of 64 dimensions"),
        (override("llama.block_count", 3), "lacks the tensors for layers.2"),
        (lambda p: write_gguf(p, tensors={**random_tensors(), "rope_freqs.weight": np.full(32, 2.0, np.float32)}),
         "RoPE frequency factors"),
        (lambda p: write_gguf(p, tensors={**random_tensors(), "blk.0.attn_q.bias": np.zeros(DIM, np.float32)}),
         "has tensor blk.0.attn_q.bias"),
    ],
    ids=["arch", "missing-kv-heads", "missing-pre", "truncated", "sentencepiece", "pre", "rope-dims", "layers",
         "rope-factors", "bias"],
)  # fmt: skip
def test_bad_files_are_clear_errors_and_leave_nothing(tmp_path, make, message):
    path = tmp_path / "m.gguf"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        convert_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_cli_error_is_one_line(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", arch="qwen2")
    result = subprocess.run(
        [sys.executable, "-m", "llama.convert", "from_gguf", "--gguf_path", str(path), "--out_dir", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {path} holds a 'qwen2' model: only the 'llama' architecture converts to a Meta checkpoint"]


def test_killed_conversion_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "llama.convert", "from_gguf", "--gguf_path", str(demo_gguf_path()),
               "--out_dir", str(out)]  # fmt: skip
    kill_once_writing(command, out, REPO)
    assert not out.exists()
    subprocess.run(command, cwd=REPO, check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["md5sum", "--quiet", "-c", "checklist.chk"], cwd=out, check=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the killed run's staging is gone too
