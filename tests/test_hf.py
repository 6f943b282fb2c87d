"""Hugging Face import and export against transformers and tokenizers: weights, configs, tokenizers, chat."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch
from checkpoints import LLAMA31_SCALING_PARAMS, TINY_PARAMS, random_state_dict, write_checkpoint
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from safetensors import safe_open

from llama import Llama, Transformer
from llama.parallel import init_model_parallel
from llama.bpe import PRETOKENIZER_PATTERNS
from llama.chat_format import ChatFormat, chat_format_for
from llama.checkpoint import CheckpointError, ShardedCheckpoint, read_params
from llama.convert import COMMANDS
from llama.hf import LLAMA3_ROPE_SCALING, convert_hf, export_hf, meta_params
from llama.checkpoint import ffn_params
from llama.model import ModelArgs
from llama.tokenizer import LLAMA3_PATTERN, SPEC_FILE, Tokenizer, TokenizerSpec, default_tokenizer_path

ROOT = Path(__file__).parent.parent
# Sorted keys, as Meta writes params.json, so that a round trip can be compared byte for byte.
PARAMS = dict(sorted(TINY_PARAMS.items()))
TEXTS = [
    "This is a test sentence.",
    "  leading spaces, 1234567 digits and\ttabs\n\n\nnewlines   ",
    "I'm sure they'll've seen it; CamelCase_snake-case ALLCAPS",
    "Größe naïve café — 日本語のテキスト, 한국어, Русский, العربية 🙂🚀",
    "<|begin_of_text|>special <|eot_id|> tokens<|start_header_id|>user<|end_header_id|>",
]
DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "  Answer briefly.\n"},
        {"role": "user", "content": "Hi there!  "},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Count: 1, 22, 333, 4444"},
    ],
    [{"role": "user", "content": "run it"}, {"role": "ipython", "content": " {\"result\": 42}\n"}],
]
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a terse assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tensors(ckpt_dir: Path) -> dict:
    checkpoint = ShardedCheckpoint(ckpt_dir, ModelArgs(**read_params(ckpt_dir)))
    cpu = torch.device("cpu")
    return {key: checkpoint.read(key, 0, 1, checkpoint.shards[0][key].dtype, cpu) for key in checkpoint.layout}


def chat_ids(hf_tokenizer, dialog) -> list:
    return hf_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def write_hf_config(hf_dir: Path, **overrides) -> Path:
    """A Hugging Face directory holding only a config.json of the tiny model with `overrides`."""
    hf_dir.mkdir()
    config = LlamaConfig(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=8, vocab_size=300)
    (hf_dir / "config.json").write_text(json.dumps({**config.to_dict(), **overrides}))
    return hf_dir


@pytest.fixture(scope="module")
def meta_ckpt(tmp_path_factory) -> Path:
    """The tiny GQA, scaled-RoPE model as a two-shard bfloat16 Meta checkpoint."""
    return write_checkpoint(tmp_path_factory.mktemp("meta") / "ckpt", PARAMS, random_state_dict(PARAMS, seed=5), 2)


@pytest.fixture(scope="module")
def exported(meta_ckpt) -> Path:
    return export_hf(meta_ckpt, meta_ckpt.parent / "hf")


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return AutoTokenizer.from_pretrained(exported)


def test_round_trip_is_bit_identical(meta_ckpt, exported, tmp_path):
    back = convert_hf(exported, tmp_path / "back")
    # Meta's params.json, plus the RoPE scaling written out (Llama 3.1's, the default for this shape)
    written = dict(sorted({**PARAMS, **LLAMA31_SCALING_PARAMS}.items()))
    assert (back / "params.json").read_bytes() == json.dumps(written).encode()
    assert (back / "tokenizer.model").read_bytes() == (meta_ckpt / "tokenizer.model").read_bytes()
    assert not (back / SPEC_FILE).exists()
    assert (back / "checklist.chk").is_file()
    original, converted = tensors(meta_ckpt), tensors(back)
    assert original.keys() == converted.keys()
    for key in original:
        assert converted[key].dtype == torch.bfloat16
        assert torch.equal(converted[key], original[key]), key
    # The export itself is Hugging Face's layout, not Meta's: rotate-half rows differ from interleaved ones.
    config = json.loads((exported / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", **LLAMA3_ROPE_SCALING}
    assert (config["intermediate_size"], config["num_key_value_heads"], config["torch_dtype"]) == (224, 2, "bfloat16")


def test_sharded_float32_export_matches_transformers(meta_ckpt, tmp_path, capsys):
    COMMANDS["to_hf"](str(meta_ckpt), str(tmp_path / "hf"), dtype="float32", max_shard_bytes=20_000_000)
    assert capsys.readouterr().out.strip().endswith(f"wrote a Hugging Face checkpoint to {tmp_path / 'hf'}")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert reference.dtype == torch.float32
    ours = Llama.build(meta_ckpt, max_seq_len=64, max_batch_size=2, dtype="float32", device="cpu")
    tokens = torch.randint(0, PARAMS["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits
    torch.testing.assert_close(ours.model.forward(tokens, 0), expected, atol=1e-4, rtol=0)


def test_exported_tokenizer_gives_metas_ids(exported, hf_tokenizer, tokenizer):
    assert hf_tokenizer.bos_token_id == 128000 and hf_tokenizer.eos_token_id == 128001
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        assert hf_tokenizer(text)["input_ids"] == [128000, *ids]
        assert hf_tokenizer.decode(ids) == text
    assert tokenizer.encode(TEXTS[0], bos=True, eos=False) == [128000, 2028, 374, 264, 1296, 11914, 13]
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}


def test_exported_tokenizer_matches_transformers_tiktoken_conversion(exported, tokenizer):
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    reference = TikTokenConverter(vocab_file=default_tokenizer_path(), extra_special_tokens=specials).converted()
    ours = HFTokenizer.from_file(str(exported / "tokenizer.json"))
    text = "\n".join(TEXTS) * 3 + " ".join(f"{i}{chr(0x400 + i)}x" for i in range(300))
    assert ours.encode(text, add_special_tokens=False).ids == reference.encode(text, add_special_tokens=False).ids
    assert ours.get_vocab() == reference.get_vocab()


@pytest.mark.parametrize("dialog", DIALOGS, ids=["user", "multi-turn", "ipython"])
def test_chat_template_renders_chat_format(hf_tokenizer, tokenizer, dialog):
    assert chat_ids(hf_tokenizer, dialog) == ChatFormat(tokenizer).encode_dialog_prompt(dialog)


def save_with_metas_tokenizer(model: LlamaForCausalLM, hf_dir: Path, **save_options) -> Path:
    """`model` as transformers saves it, with Meta's tokenizer converted by transformers."""
    model.save_pretrained(hf_dir, **save_options)
    tokenizer = Tokenizer(default_tokenizer_path())
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    converted = TikTokenConverter(vocab_file=default_tokenizer_path(), extra_special_tokens=specials).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.save_pretrained(hf_dir)
    return hf_dir


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory) -> Path:
    """A tied-embedding, scaled-RoPE Llama with Meta's tokenizer as transformers saves it, in several shards."""
    hf_dir = tmp_path_factory.mktemp("transformers") / "model"
    config = LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", **LLAMA3_ROPE_SCALING}, initializer_range=0.2,
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    )  # fmt: skip
    torch.manual_seed(0)
    return save_with_metas_tokenizer(LlamaForCausalLM(config), hf_dir, max_shard_size="10MB")


def test_import_of_transformers_save_pretrained(saved_by_transformers, tmp_path):
    assert (saved_by_transformers / "model.safetensors.index.json").is_file()
    out = convert_hf(saved_by_transformers, tmp_path / "meta")
    params = read_params(out)
    assert params["use_scaled_rope"] is True
    assert ModelArgs(**params).ffn_hidden_dim == 192
    assert (out / "tokenizer.model").read_bytes() == Path(default_tokenizer_path()).read_bytes()
    assert not (out / SPEC_FILE).exists()
    weights = tensors(out)
    assert torch.equal(weights["output.weight"], weights["tok_embeddings.weight"])

    reference = AutoModelForCausalLM.from_pretrained(saved_by_transformers).float().eval()
    ours = Llama.build(out, max_seq_len=64, max_batch_size=2, dtype="float32", device="cpu")
    tokens = torch.randint(0, 128256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
    assert expected.abs().max() > 1
    torch.testing.assert_close(ours.model.forward(tokens, 0), expected, atol=1e-4, rtol=0)


LLAMA32_ROPE_SCALING = {"rope_type": "llama3", **LLAMA3_ROPE_SCALING, "factor": 32.0}


@pytest.fixture(scope="module")
def llama32_saved(tmp_path_factory) -> Path:
    """A random model with Llama 3.2 1B's configuration but smaller (RoPE factor 32, tied embeddings, 64-wide
    heads), as transformers saves it."""
    config = LlamaConfig(
        hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=LLAMA32_ROPE_SCALING, initializer_range=0.2, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
    )  # fmt: skip
    torch.manual_seed(3)
    return save_with_metas_tokenizer(LlamaForCausalLM(config), tmp_path_factory.mktemp("llama32") / "model")


def test_llama32_converts_runs_as_transformers_and_round_trips(llama32_saved, tmp_path):
    out = convert_hf(llama32_saved, tmp_path / "meta")
    params = read_params(out)
    assert (params["use_scaled_rope"], params["rope_scaling_factor"]) == (True, 32.0)
    reference = AutoModelForCausalLM.from_pretrained(llama32_saved).float().eval()
    ours = Llama.build(out, max_seq_len=512, max_batch_size=1, dtype="float32", device="cpu")
    assert ours.model.output_is_tied()  # the checkpoint stores output.weight equal to the embedding: held once
    tokens = torch.randint(0, 128256, (1, 480), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(tokens).logits
    torch.testing.assert_close(ours.model.forward(tokens, 0), expected, atol=1e-4, rtol=0)
    generated, _ = ours.generate([tokens[0].tolist()], max_gen_len=8, temperature=0)
    with torch.no_grad():
        theirs = reference.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8, do_sample=False)
    assert generated[0] == theirs[0, 480:].tolist()

    # Meta's reference factor, 8, gives other logits on this model: the comparison above would fail with it.
    init_model_parallel(torch.device("cpu"))
    with_factor_8 = Transformer(ModelArgs(max_seq_len=512, max_batch_size=1, **{**params, "rope_scaling_factor": 8.0}))
    with_factor_8.load_state_dict(torch.load(out / "consolidated.00.pth", weights_only=True))
    assert (with_factor_8.forward(tokens, 0) - expected).abs().max() > 1e-2

    back = export_hf(out, tmp_path / "hf")
    original, again = LlamaConfig.from_pretrained(llama32_saved), LlamaConfig.from_pretrained(back)
    assert again.rope_parameters == original.rope_parameters
    assert again.tie_word_embeddings is True
    with safe_open(back / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(back).float()(tokens).logits, expected, atol=1e-5, rtol=0)


PRE_TOKENIZERS = {
    "smollm": [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)],
    "gpt2": [pre_tokenizers.ByteLevel(add_prefix_space=False)],
    LLAMA3_PATTERN: [
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ],
}


@pytest.fixture(scope="module", params=list(PRE_TOKENIZERS), ids=["smollm", "gpt2", "split-regex"])
def chatml_model(tmp_path_factory, request) -> Tuple[Path, str]:
    """A tiny Llama with a trained byte-level BPE tokenizer (ChatML, no BOS), and the tiktoken pattern of its
    pre-tokenizer."""
    hf_dir = tmp_path_factory.mktemp("chatml") / "model"
    tokenizer = HFTokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(PRE_TOKENIZERS[request.param])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*TEXTS, *(m["content"] for d in DIALOGS for m in d)] * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    fast.save_pretrained(hf_dir)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=tokenizer.get_vocab_size(), eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    return hf_dir, PRETOKENIZER_PATTERNS.get(request.param, request.param)


def test_byte_level_bpe_tokenizer_converts_both_ways(chatml_model, tmp_path):
    hf_dir, pattern = chatml_model
    original = AutoTokenizer.from_pretrained(hf_dir)
    meta = convert_hf(hf_dir, tmp_path / "meta")
    spec = TokenizerSpec.load(meta / SPEC_FILE)
    assert (spec.chat_format, spec.bos_token) == ("chatml", None)
    assert (spec.eos_token, spec.pad_token, spec.stop_tokens) == ("<|im_end|>", "<|endoftext|>", ["<|im_end|>"])
    assert spec.default_system_prompt == "You are a terse assistant."
    assert spec.pattern == pattern
    tokenizer = Tokenizer(str(meta / "tokenizer.model"))
    exported = export_hf(meta, tmp_path / "hf")
    again = AutoTokenizer.from_pretrained(exported)
    for text in TEXTS:
        ids = original(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.encode(text, bos=False, eos=False, allowed_special="all") == ids
        assert again(text)["input_ids"] == ids
    chat = chat_format_for(tokenizer)
    for dialog in DIALOGS:
        assert chat.encode_dialog_prompt(dialog) == chat_ids(original, dialog) == chat_ids(again, dialog)


def test_ffn_params_reproduce_hidden_sizes():
    assert ffn_params(4096, 14336) == {"multiple_of": 1024, "ffn_dim_multiplier": 1.3}
    for dim, hidden in [(64, 224), (64, 192), (576, 1536), (960, 2560), (2048, 5632), (4096, 11008), (96, 257), (8, 1)]:
        params = ffn_params(dim, hidden)
        assert ModelArgs(dim=dim, n_heads=1, **params).ffn_hidden_dim == hidden, (dim, hidden, params)
    assert ffn_params(64, 224) == {"multiple_of": 32, "ffn_dim_multiplier": 1.3}
    assert ffn_params(4096, 11008) == {"multiple_of": 256}


@pytest.mark.parametrize(
    "rope, scaled",
    [
        ({"rope_scaling": {"rope_type": "llama3", **LLAMA3_ROPE_SCALING}}, True),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3_ROPE_SCALING}}, True),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, False),
        ({"rope_scaling": None}, False),
    ],
)
def test_rope_scaling_maps_to_use_scaled_rope(rope, scaled):
    config = {**LlamaConfig(hidden_size=64, intermediate_size=224, num_attention_heads=8).to_dict(), **rope}
    config.pop("rope_parameters" if "rope_scaling" in rope else "rope_scaling", None)
    assert meta_params(config).get("use_scaled_rope", False) is scaled


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 32.0}}, "RoPE scaling lacks low_freq_factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"head_dim": 16}, "head_dim 16"),
        ({"hidden_act": "gelu"}, "hidden_act gelu"),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "only LlamaForCausalLM"),
    ],
)
def test_unsupported_configs_are_named(tmp_path, overrides, message):
    hf_dir = write_hf_config(tmp_path / "hf", rope_parameters=None, **overrides)
    with pytest.raises(CheckpointError, match=message):
        convert_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line(tmp_path):
    hf_dir = write_hf_config(tmp_path / "hf", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    command = [sys.executable, "-m", "llama.convert", "from_hf", "--hf_dir", str(hf_dir), "--out_dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: config.json describes a gpt2 model")
    assert not (tmp_path / "out").exists()


def test_interrupted_conversions_leave_nothing(meta_ckpt, exported, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llama.hf.hf_tokenizer_files", interrupt)  # after config.json is written
    with pytest.raises(KeyboardInterrupt):
        export_hf(meta_ckpt, tmp_path / "hf")
    monkeypatch.setattr(torch, "save", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_hf(exported, tmp_path / "meta")
    assert list(tmp_path.iterdir()) == []
