"""Mapping between Meta's Llama parameter layout and Hugging Face's LlamaForCausalLM, and converting whole
checkpoint directories between the two.

Meta rotates interleaved pairs (x[2i], x[2i+1]) of each query/key head; Hugging Face rotates halves
(x[i], x[i + head_dim/2]). Converting permutes the rows of wq and wk head by head.

A Hugging Face directory is `config.json`, `model.safetensors` (or shards listed in
`model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`.
Tokenizers travel as byte-level BPE: Meta's tiktoken ranks are the token ids of a BPE whose merges follow
the ranks, so each side is rebuilt from the other and checked to encode alike.
"""

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiktoken.load import load_tiktoken_bpe
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from .bpe import PRETOKENIZER_PATTERNS, byte_level_text, merges_for_ranks, ranks_from_byte_level_vocab, write_tokenizer
from .checkpoint import (
    OUTPUT_KEY, CheckpointError, ShardedCheckpoint, ffn_params, parameter_layout, read_params, staged_directory,
)
from .chat_format import default_system_prompt
from .model import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT, ROPE_SCALE_FACTOR, ModelArgs
from .parallel import pick_dtype
from .tokenizer import LLAMA3_PATTERN, SPEC_FILE, Tokenizer, TokenizerSpec, default_tokenizer_path

# Meta name -> Hugging Face name; "{}" is the layer number.
META_TO_HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}

# Llama 3.1's RoPE scaling as Hugging Face writes it (rope_type llama3, the only type the model implements).
LLAMA3_ROPE_SCALING = {
    "factor": ROPE_SCALE_FACTOR,
    "low_freq_factor": ROPE_LOW_FREQ_FACTOR,
    "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
    "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT,
}
# Context lengths Meta trained Llama 3 (unscaled RoPE) and 3.1 (scaled) for; Meta's params.json omits them.
CONTEXT_LENGTH = {False: 8192, True: 131072}
# Tensors some Hugging Face checkpoints carry that the model recomputes.
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
MAX_SHARD_BYTES = 5 * 10**9
# Text that exercises a pre-tokenizer: contractions, digit runs, whitespace runs, punctuation, scripts, emoji.
TOKENIZER_PROBE = (
    "Hello world! I'm here, they'll see; we've 12345 apples & 3.14159 pies.\n\n\tIndented  double  spaces   "
    "\r\nCamelCaseWord snake_case_word URL: https://example.com/a?b=c#d  <tag attr=\"x\">…</tag>\n"
    "Größe naïve café – 日本語のテキスト, 中文文本, 한국어, Русский текст, العربية, हिन्दी 🙂🚀 "
    "def f(x):\n    return x ** 2  # comment\n\n\n   trailing   "
)


def interleaved_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved RoPE pairs (Meta) to rotate-half order (Hugging Face)."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_halves`."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(args: ModelArgs, tied: bool = False) -> dict:
    """A LlamaForCausalLM `config.json` for the model `args` describes (`tied`: its output projection is the
    embedding matrix)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
    }
    if args.use_scaled_rope:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_context,
        }
    return config


def hf_name(key: str) -> str:
    """The Hugging Face name of Meta parameter `key`."""
    parts = key.split(".")
    layer = parts[1] if parts[0] == "layers" else None
    template = key if layer is None else key.replace(f"layers.{layer}.", "layers.{}.", 1)
    if template not in META_TO_HF_NAMES:
        raise KeyError(f"{key} is not a Llama parameter")
    return META_TO_HF_NAMES[template].format(layer)


def _permute_rope_rows(
    key: str, tensor: torch.Tensor, args: ModelArgs, permute: Callable[[torch.Tensor, int], torch.Tensor]
) -> torch.Tensor:
    """`permute(tensor, heads)` for the query and key projections, `tensor` itself for other parameters."""
    if key.endswith("attention.wq.weight"):
        return permute(tensor, args.n_heads)
    if key.endswith("attention.wk.weight"):
        return permute(tensor, args.n_kv_heads)
    return tensor


def meta_to_hf_state_dict(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Full (unsharded) Meta weights renamed and permuted for LlamaForCausalLM."""
    return {hf_name(key): _permute_rope_rows(key, tensor, args, interleaved_to_halves) for key, tensor in state.items()}


def _read_json(path: Path, what_to_do: str) -> dict:
    """The JSON object in `path`; a CheckpointError saying `what_to_do` if it is missing or malformed."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {what_to_do}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): {what_to_do}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object: {what_to_do}")
    return data


def _rope_scaling_params(config: dict) -> dict:
    """The params.json RoPE scaling keys for a Hugging Face config's scaling: none, or any llama3-type scaling
    (Llama 3.1's, 3.2's factor 32, ...); an error for any other type."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind != "llama3":
        raise CheckpointError(
            f"RoPE scaling {json.dumps(rope)} is not supported: only none or rope_type llama3 (Llama 3.1 to 3.3's) is"
        )
    missing = [key for key in LLAMA3_ROPE_SCALING if not isinstance(rope.get(key), (int, float))]
    if missing:
        raise CheckpointError(f"config.json's llama3 RoPE scaling lacks {', '.join(missing)}: use the model's original config.json")
    return {
        "use_scaled_rope": True,
        "rope_scaling_factor": float(rope["factor"]),
        "rope_low_freq_factor": float(rope["low_freq_factor"]),
        "rope_high_freq_factor": float(rope["high_freq_factor"]),
        "rope_original_context": int(rope["original_max_position_embeddings"]),
    }


def meta_params(config: dict) -> dict:
    """Meta `params.json` hyperparameters for a Hugging Face Llama `config.json`; an error for models this repo
    cannot run."""
    model_type, architectures = config.get("model_type"), config.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or architectures != ["LlamaForCausalLM"]:
        raise CheckpointError(
            f"config.json describes a {model_type} model ({', '.join(map(str, architectures))}): only "
            f"LlamaForCausalLM checkpoints (model_type llama) can be converted"
        )
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in required if not isinstance(config.get(key), int)]
    if missing:
        raise CheckpointError(f"config.json lacks integer {', '.join(missing)}: use the model's original config.json")
    unsupported = [key for key in ("attention_bias", "mlp_bias") if config.get(key)]
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {config['hidden_act']}")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads) or dim % n_heads:
        unsupported.append(f"head_dim {config.get('head_dim')} with hidden_size {dim} and {n_heads} heads")
    if unsupported:
        raise CheckpointError(
            f"config.json sets {', '.join(unsupported)}: this repo runs only Meta's Llama architecture "
            f"(no biases, SiLU, head_dim = hidden_size / num_attention_heads)"
        )
    rope = config.get("rope_parameters") or {}
    params = {
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "vocab_size": config["vocab_size"],
        **ffn_params(dim, config["intermediate_size"]),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
        **_rope_scaling_params(config),
    }
    try:
        ModelArgs(**params)  # checks head counts and the scaling
    except ValueError as e:
        raise CheckpointError(str(e).replace("params.json", "config.json")) from None
    return dict(sorted(params.items()))


def _hf_weight_files(hf_dir: Path) -> Dict[str, Path]:
    """The safetensors file that holds each tensor of a Hugging Face checkpoint directory."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "download the checkpoint again").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map: download the checkpoint again")
        files = {name: hf_dir / file for name, file in weight_map.items()}
        absent = sorted({str(path) for path in files.values() if not path.is_file()})
        if absent:
            raise CheckpointError(f"{', '.join(absent[:3])} missing: download every shard {index.name} lists")
        return files
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json: download the safetensors weights"
        )
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _hf_to_meta_tensors(
    hf_dir: Path, args: ModelArgs, tied: bool, dtype: Optional[torch.dtype]
) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Meta name, full tensor) for every parameter, read one at a time from the safetensors files."""
    files = _hf_weight_files(hf_dir)
    layout = parameter_layout(args)
    names = {key: hf_name(key) for key in layout}
    ignored = {name for name in files if name.endswith(HF_IGNORED_SUFFIXES)}
    if tied or names["output.weight"] not in files:
        ignored.add(names["output.weight"])  # tied: the output projection is the embedding
        names["output.weight"] = names["tok_embeddings.weight"]
    unexpected, missing = sorted(set(files) - set(names.values()) - ignored), sorted(set(names.values()) - set(files))
    if unexpected or missing:
        problems = (("missing", missing), ("unexpected", unexpected))
        found = "; ".join(f"{what} {', '.join(keys[:3])}" for what, keys in problems if keys)
        raise CheckpointError(f"the weights do not match config.json ({found}): this is not a plain Llama checkpoint")
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(path, framework="pt")) for path in set(files.values())}
        for key, name in names.items():
            tensor = handles[files[name]].get_tensor(name)
            if tuple(tensor.shape) != layout[key][0]:
                raise CheckpointError(
                    f"{name} is {tuple(tensor.shape)} but config.json implies {layout[key][0]}: "
                    f"use the config.json that came with these weights"
                )
            tensor = _permute_rope_rows(key, tensor, args, halves_to_interleaved)
            yield key, tensor.to(dtype or tensor.dtype).clone()


def _token_name(value: object) -> Optional[str]:
    """A token in tokenizer_config.json: a string or an AddedToken object with `content`."""
    return value.get("content") if isinstance(value, dict) else value


def _pretokenizer_pattern(pre_tokenizer: Optional[dict]) -> str:
    """The tiktoken pattern equivalent to a byte-level tokenizer.json pre_tokenizer; an error if none is known."""
    pre = pre_tokenizer or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    steps = [step for step in steps if isinstance(step, dict)]
    kinds = [step.get("type") for step in steps]
    if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space"):
        first, regex = steps[0], steps[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return PRETOKENIZER_PATTERNS["gpt2"]
        if kinds == ["Digits", "ByteLevel"] and regex and first.get("individual_digits"):
            return PRETOKENIZER_PATTERNS["smollm"]
        isolated = first.get("behavior") == "Isolated" and not first.get("invert")
        if kinds == ["Split", "ByteLevel"] and not regex and isolated and "Regex" in first.get("pattern", {}):
            return first["pattern"]["Regex"]
    raise CheckpointError(
        f"tokenizer.json's pre_tokenizer {json.dumps(pre_tokenizer)[:200]} is not one this repo can reproduce: "
        f"only byte-level BPE with GPT-2's, Llama 3's or a single Split regex pre-tokenizer converts"
    )


def _bos_token(tokenizer: dict, tokenizer_config: dict) -> Optional[str]:
    """The token tokenizer.json's post-processor puts first, else tokenizer_config's BOS if it adds one."""
    processors = [tokenizer.get("post_processor") or {}]
    processors += processors[0].get("processors", [])
    for processor in processors:
        if processor.get("type") == "TemplateProcessing" and "SpecialToken" in processor["single"][0]:
            return processor["single"][0]["SpecialToken"]["id"]
    return _token_name(tokenizer_config.get("bos_token")) if tokenizer_config.get("add_bos_token") else None


def _byte_level_vocab(tokenizer: dict) -> Tuple[List[str], List[int]]:
    """Token text by id (BPE vocabulary and added tokens) and the ids of control tokens."""
    model = tokenizer.get("model") or {}
    decoder = (tokenizer.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise CheckpointError(
            f"tokenizer.json holds a {model.get('type')} model with a {decoder} decoder: only byte-level BPE "
            f"tokenizers (Llama 3, GPT-2 style) convert; SentencePiece ones (Llama 2) do not"
        )
    if tokenizer.get("normalizer"):
        raise CheckpointError("tokenizer.json normalizes text, which tiktoken cannot: this tokenizer cannot be converted")
    by_id = {i: token for token, i in model["vocab"].items()}
    special = []
    for added in tokenizer.get("added_tokens", []):
        if added.get("special") or added["id"] not in by_id:
            special.append(added["id"])
        by_id[added["id"]] = added["content"]
    if sorted(by_id) != list(range(len(by_id))):
        raise CheckpointError("tokenizer.json's token ids are not 0..N-1 without gaps: this tokenizer cannot be converted")
    previous = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = model["vocab"].get(left + right, -1)
        if merged < previous:
            raise CheckpointError(
                "tokenizer.json's merges do not follow its token ids, so ranks cannot reproduce them: "
                "this tokenizer cannot be converted"
            )
        previous = merged
    return [by_id[i] for i in range(len(by_id))], special


def _is_metas_llama3(ranks: Dict[bytes, int], spec: TokenizerSpec) -> bool:
    """Whether ranks and spec are exactly Meta's Llama 3 tokenizer.model and its built-in spec."""
    llama3 = TokenizerSpec.llama3(len(ranks))
    if spec.pattern != LLAMA3_PATTERN or spec.special_tokens != llama3.special_tokens or len(ranks) != 128000:
        return False
    try:
        return load_tiktoken_bpe(default_tokenizer_path()) == ranks
    except (FileNotFoundError, ValueError):
        return False


def _optional_json(path: Path) -> dict:
    """The JSON object in `path`, or {} if there is no such file."""
    return _read_json(path, f"delete or fix {path.name}") if path.is_file() else {}


def _chat_template_source(hf_dir: Path, tokenizer_config: dict) -> Optional[str]:
    """The Jinja chat template in tokenizer_config.json or chat_template.jinja, if any."""
    template = tokenizer_config.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def _spec_from_hf(
    hf_dir: Path, config: dict, tokenizer: dict, tokenizer_config: dict, tokens: List[str], special_ids: List[int]
) -> TokenizerSpec:
    """The TokenizerSpec of a Hugging Face byte-level BPE tokenizer (without a default system prompt)."""
    special = {tokens[i]: i for i in special_ids}
    generation = _optional_json(hf_dir / "generation_config.json")

    def ids(value: object) -> List[int]:
        values = value if isinstance(value, list) else [value]
        return [i for i in values if isinstance(i, int) and 0 <= i < len(tokens)]

    eos_ids = ids(config.get("eos_token_id")) + ids(generation.get("eos_token_id"))
    eos = _token_name(tokenizer_config.get("eos_token")) or (tokens[eos_ids[0]] if eos_ids else None)
    bos = _bos_token(tokenizer, tokenizer_config)
    if eos is None:
        raise CheckpointError(
            "neither tokenizer_config.json nor config.json names an EOS token: add eos_token_id to config.json"
        )
    for what, name in (("EOS", eos), ("BOS", bos)):
        if name is not None and name not in special:
            raise CheckpointError(
                f"the tokenizer's {what} {name!r} is not a special token: this tokenizer cannot be converted"
            )
    chat_format, chat_end = "llama3", "<|eot_id|>"
    if "<|im_start|>" in special and "<|im_end|>" in special:
        chat_format, chat_end = "chatml", "<|im_end|>"
    stops = {eos, *(tokens[i] for i in eos_ids if tokens[i] in special), *([chat_end] if chat_end in special else [])}
    pad = _token_name(tokenizer_config.get("pad_token"))
    return TokenizerSpec(
        pattern=_pretokenizer_pattern(tokenizer.get("pre_tokenizer")),
        special_tokens=special,
        n_words=config["vocab_size"],
        bos_token=bos,
        eos_token=eos,
        pad_token=pad if pad in special else eos,
        stop_tokens=sorted(stops, key=special.__getitem__),
        chat_format=chat_format,
    )


def import_hf_tokenizer(hf_dir: Path, config: dict, out_dir: Path) -> None:
    """Write the tokenizer of a Hugging Face directory into `out_dir` as tokenizer.model (+ tokenizer_spec.json
    unless it is Meta's Llama 3 tokenizer), and check that it encodes text as tokenizer.json does."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    path = hf_dir / "tokenizer.json"
    tokenizer = _read_json(path, "download the model's tokenizer.json")
    tokenizer_config = _optional_json(hf_dir / "tokenizer_config.json")
    tokens, special_ids = _byte_level_vocab(tokenizer)
    spec = _spec_from_hf(hf_dir, config, tokenizer, tokenizer_config, tokens, special_ids)
    try:
        ranks = ranks_from_byte_level_vocab(tokens, special_ids)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    template = _chat_template_source(hf_dir, tokenizer_config)
    if _is_metas_llama3(ranks, spec):
        shutil.copyfile(default_tokenizer_path(), out_dir / "tokenizer.model")
    else:
        write_tokenizer(out_dir, ranks, spec)
        if template is not None:
            spec.default_system_prompt = default_system_prompt(template, Tokenizer(str(out_dir / "tokenizer.model")))
            spec.save(out_dir / SPEC_FILE)
    ours = Tokenizer(str(out_dir / "tokenizer.model")).encode(TOKENIZER_PROBE, bos=False, eos=False)
    theirs = HFTokenizer.from_str(path.read_text(encoding="utf-8")).encode(TOKENIZER_PROBE, add_special_tokens=False).ids
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise CheckpointError(
            f"the converted tokenizer encodes text differently from {path} (from token {at} on): "
            f"this tokenizer cannot be converted"
        )


def convert_hf(hf_dir: str, out_dir: str, dtype: Optional[str] = None) -> Path:
    """Write a Hugging Face Llama directory as a Meta checkpoint directory.

    --out_dir gets params.json, consolidated.00.pth, the tokenizer files and checklist.chk; --dtype defaults to
    the weights'."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir} is not a directory: pass --hf_dir with a downloaded Hugging Face model")
    config = _read_json(hf_dir / "config.json", "download the model's config.json")
    params = meta_params(config)
    args = ModelArgs(**params)
    target = None if dtype is None else pick_dtype(dtype, torch.device("cpu"))
    tied = bool(config.get("tie_word_embeddings", False))
    with staged_directory(out_dir) as staging:
        import_hf_tokenizer(hf_dir, config, staging)
        (staging / "params.json").write_text(json.dumps(params))
        tensors = _hf_to_meta_tensors(hf_dir, args, tied, target)
        state = dict(tqdm(tensors, total=len(parameter_layout(args)), desc="converting", unit="tensor"))
        torch.save(state, staging / "consolidated.00.pth")
    return out_dir


def chat_template(spec: TokenizerSpec) -> str:
    """A Jinja chat template that renders dialogs as the spec's chat format does."""
    if spec.chat_format == "llama3":
        header, end = "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n", "<|eot_id|>"
        content = (
            "{% if message['role'] == 'ipython' %}{{ message['content'] }}"
            "{% else %}{{ message['content'] | trim }}{% endif %}"
        )
    elif spec.chat_format == "chatml":
        header, content, end = "<|im_start|>{{ message['role'] }}\n", "{{ message['content'] }}", "<|im_end|>\n"
    else:
        raise ValueError(f"chat format {spec.chat_format!r} has no Hugging Face chat template")
    default_system = ""
    if spec.default_system_prompt is not None:
        system = json.dumps({"role": "system", "content": spec.default_system_prompt}, ensure_ascii=False)
        default_system = (
            f"{{% if messages[0]['role'] != 'system' %}}{{% set messages = [{system}] + messages %}}{{% endif %}}"
        )
    bos = "" if spec.bos_token is None else "{{ bos_token }}"
    open_reply = header.replace("{{ message['role'] }}", "assistant")
    return (
        f"{default_system}{bos}{{% for message in messages %}}{header}{content}{end}{{% endfor %}}"
        f"{{% if add_generation_prompt %}}{open_reply}{{% endif %}}"
    )


def hf_tokenizer_files(tokenizer_path: Path, spec: TokenizerSpec, out_dir: Path, max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json for a tiktoken `tokenizer.model` and its spec."""
    ranks = load_tiktoken_bpe(str(tokenizer_path))
    text = byte_level_text(ranks, spec.n_words)
    vocab = {**{text[token]: ranks[token] for token in text}, **spec.special_tokens}
    tokenizer = HFTokenizer(models.BPE(vocab, merges_for_ranks(text, ranks), ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(spec.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    if spec.bos_token is not None:
        bos = spec.bos_token
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, spec.special_tokens[bos])]
        )
    names = sorted(spec.special_tokens, key=spec.special_tokens.__getitem__)
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    tokenizer.save(str(Path(out_dir) / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec.bos_token,
        "eos_token": spec.eos_token,
        "pad_token": spec.pad_token,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(spec),
    }
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _shard_plan(layout: Dict[str, Tuple[int, ...]], element_size: int, max_bytes: int) -> List[List[str]]:
    """Parameters grouped, in order, into files of at most `max_bytes` (a larger tensor gets a file of its own)."""
    groups: List[List[str]] = [[]]
    size = 0
    for key, shape in layout.items():
        nbytes = math.prod(shape) * element_size
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def export_source(ckpt_dir: Path) -> Tuple[ShardedCheckpoint, Tokenizer]:
    """The checkpoint and tokenizer of an unquantized Meta checkpoint directory to export, checked."""
    args = ModelArgs(**read_params(ckpt_dir))
    tokenizer_path = ckpt_dir / "tokenizer.model"
    tokenizer = Tokenizer(str(tokenizer_path))
    if tokenizer.n_words != args.vocab_size:
        raise CheckpointError(
            f"params.json has vocab_size {args.vocab_size} but {tokenizer_path} has {tokenizer.n_words} tokens: "
            f"use the tokenizer.model that came with this checkpoint"
        )
    checkpoint = ShardedCheckpoint(ckpt_dir, args)
    if checkpoint.quantization:
        raise CheckpointError(f"{ckpt_dir} is quantized ({checkpoint.quantization}): export the original checkpoint")
    return checkpoint, tokenizer


def export_hf(ckpt_dir: str, out_dir: str, dtype: Optional[str] = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a Meta checkpoint as a Hugging Face directory.

    --out_dir gets config.json, generation_config.json, model.safetensors (split into shards past
    --max_shard_bytes) and the tokenizer files; --dtype defaults to the checkpoint's."""
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"--max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    checkpoint, tokenizer = export_source(ckpt_dir)
    args = checkpoint.args
    args.max_seq_len = CONTEXT_LENGTH[args.use_scaled_rope]
    tokenizer_path = ckpt_dir / "tokenizer.model"
    target = checkpoint.shards[0]["tok_embeddings.weight"].dtype if dtype is None else pick_dtype(dtype, torch.device("cpu"))
    eos_ids = sorted(tokenizer.stop_tokens)
    tied = checkpoint.tied_output
    config = {
        **hf_config(args, tied),
        "torch_dtype": str(target).removeprefix("torch."),
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
    }
    shapes = {key: shape for key, (shape, _) in checkpoint.layout.items() if not (tied and key == OUTPUT_KEY)}
    groups = _shard_plan(shapes, target.itemsize, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    if len(files) == 1:
        files = ["model.safetensors"]
    weight_map: Dict[str, str] = {}
    with staged_directory(out_dir) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0]}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        hf_tokenizer_files(tokenizer_path, tokenizer.spec, staging, args.max_seq_len)
        with tqdm(total=len(shapes), desc="exporting", unit="tensor") as progress:
            for group, file in zip(groups, files):
                tensors = {}
                for key in group:
                    full = checkpoint.read(key, 0, 1, target, torch.device("cpu"))
                    tensors.update(meta_to_hf_state_dict({key: full}, args))
                    progress.update()
                save_file({name: t.contiguous() for name, t in tensors.items()}, staging / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, file))
        if len(files) > 1:
            total = sum(math.prod(shape) * target.itemsize for shape in shapes.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir
