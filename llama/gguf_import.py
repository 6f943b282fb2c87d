"""Convert a Llama-architecture GGUF file (llama.cpp's format, any quantization `gguf` can dequantize) into
a Meta checkpoint directory: params.json, consolidated.00.pth, tokenizer.model, tokenizer_spec.json.

    python -m llama.convert from_gguf --gguf_path model.gguf --out_dir D [--dtype bfloat16]

GGUF stores query/key rows in Meta's interleaved RoPE layout already, so every weight is taken as is.
"""

import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .bpe import pretokenizer_pattern, ranks_from_byte_level_vocab, write_tokenizer
from .chat_format import default_system_prompt
from .checkpoint import CheckpointError, ffn_params, parameter_layout, staged_directory
from .model import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT, ModelArgs, rope_frequencies
from .parallel import pick_dtype
from .tokenizer import SPEC_FILE, Tokenizer, TokenizerSpec

ARCHITECTURE = "llama"
CONTROL_TOKEN = 3  # llama.cpp's token type of special (control) tokens
# Tokens that end a turn or a text in the vocabularies of common chat models.
STOP_TOKEN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>")
ROPE_FACTORS_RTOL = 1e-4

GLOBAL_TENSORS = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
LAYER_TENSORS = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
ROPE_FREQS_TENSOR = "rope_freqs.weight"


class GGUFFile:
    """A GGUF file's metadata, read with clear errors for what a conversion needs."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} not found: pass the path to a .gguf model file")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:
            raise CheckpointError(
                f"cannot read {self.path} as GGUF ({type(e).__name__}: {e}): the file is truncated or not GGUF, "
                f"download it again"
            ) from None
        self.arch = self.get("general.architecture")
        if self.arch != ARCHITECTURE:
            raise CheckpointError(
                f"{self.path} holds a {self.arch!r} model: only the {ARCHITECTURE!r} architecture converts to a Meta checkpoint"
            )

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: object = KeyError) -> object:
        """The value of metadata `key`; without a default, a missing key is an error naming it."""
        if key not in self.reader.fields:
            if default is KeyError:
                raise CheckpointError(
                    f"{self.path} lacks the metadata key {key!r}: convert the model to GGUF again with a recent llama.cpp"
                )
            return default
        return self.reader.fields[key].contents()

    def hparam(self, name: str) -> object:
        """The architecture's hyperparameter `name`, e.g. "embedding_length"."""
        return self.get(f"{self.arch}.{name}")


def _float32_value(value: float) -> float:
    """The shortest decimal that is the same float32 as `value` (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(value)))


def model_params(model: GGUFFile) -> Dict[str, object]:
    """Meta's params.json for the GGUF's hyperparameters (RoPE scaling decided later, from the tensors)."""
    if model.get(f"{model.arch}.expert_count", 0):
        raise CheckpointError(f"{model.path} is a mixture-of-experts model: only dense Llama models convert")
    scaling = model.get(f"{model.arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(
            f"{model.path} uses {scaling!r} RoPE scaling: only llama3-type scaling (rope_freqs factors) converts"
        )
    dim, n_heads = int(model.hparam("embedding_length")), int(model.hparam("attention.head_count"))
    params = {
        "dim": dim,
        "n_layers": int(model.hparam("block_count")),
        "n_heads": n_heads,
        "n_kv_heads": int(model.hparam("attention.head_count_kv")),
        "vocab_size": int(model.get(f"{model.arch}.vocab_size", None) or len(model.get("tokenizer.ggml.tokens"))),
        **ffn_params(dim, int(model.hparam("feed_forward_length"))),
        "norm_eps": _float32_value(model.hparam("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(model.hparam("rope.freq_base")),
        "use_scaled_rope": False,
    }
    if dim % n_heads or n_heads % params["n_kv_heads"]:
        raise CheckpointError(
            f"{model.path}: embedding_length {dim} must divide by head_count {n_heads}, and that by "
            f"head_count_kv {params['n_kv_heads']}: the file's metadata is corrupt"
        )
    head_dim = dim // n_heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = model.get(f"{model.arch}.{key}", head_dim)
        if value != head_dim:
            raise CheckpointError(
                f"{model.path} has {key} {value} but heads of {head_dim} dimensions (embedding_length / head_count): "
                f"Meta's Llama rotates and attends over whole heads, so this model cannot convert"
            )
    return params


def _rope_scaling(model: GGUFFile, factors: np.ndarray, params: Dict[str, object]) -> Dict[str, object]:
    """The llama3-type RoPE scaling (see ModelArgs) whose `rope_freqs` factors (each frequency is divided by its
    factor) are `factors`; an error for any other. The factors fix the scaling's wavelengths, not the original
    context they are measured in: the scaling keeps Meta's 8192 and derives the frequency factors for it."""
    unscaled = rope_frequencies(ModelArgs(**params)).double().numpy()
    factor = _float32_value(float(factors.max()))
    candidates = [(ROPE_LOW_FREQ_FACTOR, ROPE_HIGH_FREQ_FACTOR)]
    # Between the two wavelengths 1/f = (1 - s)/factor + s, where s = context/(2 pi (high - low)) freq - low/(high - low).
    between = (factors > 1 + ROPE_FACTORS_RTOL) & (factors < factor * (1 - ROPE_FACTORS_RTOL))
    if factor > 1 and between.sum() >= 2:
        smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(unscaled[between], smooth, 1)
        width = ROPE_ORIGINAL_CONTEXT / (2 * math.pi * slope)
        candidates.append((round(-intercept * width, 4), round((1 - intercept) * width, 4)))
    for low, high in candidates:
        scaling = {
            "use_scaled_rope": True, "rope_scaling_factor": factor, "rope_low_freq_factor": low,
            "rope_high_freq_factor": high, "rope_original_context": ROPE_ORIGINAL_CONTEXT,
        }
        try:
            expected = unscaled / rope_frequencies(ModelArgs(**{**params, **scaling})).double().numpy()
        except ValueError:
            continue
        if factors.shape == expected.shape and np.allclose(factors, expected, rtol=ROPE_FACTORS_RTOL):
            return scaling
    raise CheckpointError(
        f"{model.path} has RoPE frequency factors ({ROPE_FREQS_TENSOR}) other than a llama3-type scaling "
        f"(Llama 3.1 to 3.3's): this model cannot convert to a Meta checkpoint"
    )


def _dequantized(tensor: "gguf.ReaderTensor") -> torch.Tensor:
    """A GGUF tensor as float32 in PyTorch's (rows, columns) order."""
    shape = [int(n) for n in reversed(tensor.shape)]
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return torch.from_numpy(np.require(values, np.float32, ["C", "W"]).reshape(shape))
    except NotImplementedError:
        raise CheckpointError(
            f"tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the installed gguf package cannot "
            f"dequantize: upgrade it (pip install -U gguf) or use another quantization of the model"
        ) from None
    except ValueError:
        raise CheckpointError(f"tensor {tensor.name} of the GGUF file is truncated: download the file again") from None


def meta_name(gguf_name: str) -> Optional[str]:
    """The Meta parameter name of a GGUF tensor name, or None for names outside a dense Llama."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.weight"
    return None


def read_weights(model: GGUFFile, params: Dict[str, object], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Every weight in Meta's names, dequantized and cast to `dtype`; adds the RoPE scaling to `params`."""
    state: Dict[str, torch.Tensor] = {}
    for tensor in tqdm(model.reader.tensors, desc="dequantizing", unit="tensor"):
        if tensor.name == ROPE_FREQS_TENSOR:
            params.update(_rope_scaling(model, _dequantized(tensor).numpy(), params))
            continue
        name = meta_name(tensor.name)
        if name is None:
            raise CheckpointError(
                f"{model.path} has tensor {tensor.name}, which a dense Llama does not: this model cannot convert"
            )
        state[name] = _dequantized(tensor).to(dtype)
    if "output.weight" not in state and "tok_embeddings.weight" in state:  # output tied to the embedding
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    layout = parameter_layout(ModelArgs(**params))
    missing = sorted(set(layout) - set(state))
    if missing:
        raise CheckpointError(f"{model.path} lacks the tensors for {', '.join(missing[:5])}: the file is incomplete")
    for key, (shape, _) in layout.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{model.path}: {key} has shape {tuple(state[key].shape)} but the metadata implies {shape}: "
                f"the file's metadata does not fit its tensors"
            )
    return {key: state[key] for key in layout}


def tokenizer_spec(model: GGUFFile, vocab_size: int) -> Tuple[List[str], TokenizerSpec]:
    """The vocabulary and the tokenizer spec the GGUF metadata describes (no default system prompt yet)."""
    kind = model.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{model.path} has a {kind!r} tokenizer: only byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2') convert"
        )
    tokens = list(model.get("tokenizer.ggml.tokens"))
    types = list(model.get("tokenizer.ggml.token_type"))
    if len(tokens) != vocab_size or len(types) != vocab_size:
        raise CheckpointError(
            f"{model.path} has {len(tokens)} tokens and {len(types)} token types for a vocabulary of {vocab_size}: "
            f"the tokenizer metadata is corrupt"
        )

    def token_id(key: str) -> int:
        value = int(model.get(key))
        if not 0 <= value < vocab_size:
            raise CheckpointError(f"{model.path} has {key} {value}, outside the vocabulary of {vocab_size}")
        return value

    ids = {"eos": token_id("tokenizer.ggml.eos_token_id")}
    if model.get("tokenizer.ggml.add_bos_token", True):
        ids["bos"] = token_id("tokenizer.ggml.bos_token_id")
    has_pad = model.has("tokenizer.ggml.padding_token_id")
    ids["pad"] = token_id("tokenizer.ggml.padding_token_id") if has_pad else ids["eos"]
    special = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind == CONTROL_TOKEN}
    special.update({tokens[i]: i for i in ids.values()})  # BOS/EOS/pad are special whatever their type
    eos = tokens[ids["eos"]]
    stop = [eos, *(t for t in STOP_TOKEN_TEXTS if t in special and t != eos)]
    chat_format = "chatml" if "<|im_start|>" in special and "<|im_end|>" in special else "llama3"
    try:
        pattern = pretokenizer_pattern(str(model.get("tokenizer.ggml.pre")))
    except ValueError as e:
        raise CheckpointError(f"{model.path}: {e}") from None
    spec = TokenizerSpec(
        pattern=pattern,
        special_tokens=special,
        n_words=vocab_size,
        bos_token=tokens[ids["bos"]] if "bos" in ids else None,
        eos_token=eos,
        pad_token=tokens[ids["pad"]],
        stop_tokens=stop,
        chat_format=chat_format,
    )
    return tokens, spec


def convert_gguf(gguf_path: Union[str, Path], out_dir: Union[str, Path], dtype: str = "float32") -> Path:
    """Write a Llama GGUF model as a Meta checkpoint directory.

    --out_dir must not exist or be empty; the weights in --dtype. Returns `out_dir`."""
    torch_dtype = pick_dtype(dtype, torch.device("cpu"))
    model = GGUFFile(Path(gguf_path))
    params = model_params(model)
    tokens, spec = tokenizer_spec(model, params["vocab_size"])
    try:
        ranks = ranks_from_byte_level_vocab(tokens, set(spec.special_tokens.values()))
    except ValueError as e:
        raise CheckpointError(f"{model.path}: {e}") from None
    state = read_weights(model, params, torch_dtype)
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        write_tokenizer(staging, ranks, spec)
        template = model.get("tokenizer.chat_template", None)
        if template is not None:
            spec.default_system_prompt = default_system_prompt(str(template), Tokenizer(str(staging / "tokenizer.model")))
            spec.save(staging / SPEC_FILE)
        (staging / "params.json").write_text(json.dumps(params, indent=1))
        torch.save(state, staging / "consolidated.00.pth")
    return out_dir
