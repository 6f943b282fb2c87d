"""Mapping between Meta's Llama parameter layout and Hugging Face's LlamaForCausalLM.

Meta rotates interleaved pairs (x[2i], x[2i+1]) of each query/key head; Hugging Face rotates halves
(x[i], x[i + head_dim/2]). Converting permutes the rows of wq and wk head by head.
"""

from typing import Dict

import torch

from .model import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT, ROPE_SCALE_FACTOR, ModelArgs

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


def hf_config(args: ModelArgs) -> dict:
    """A LlamaForCausalLM `config.json` for the model `args` describes."""
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
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
    }
    if args.use_scaled_rope:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": ROPE_SCALE_FACTOR,
            "low_freq_factor": ROPE_LOW_FREQ_FACTOR,
            "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
            "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT,
        }
    return config


def meta_to_hf_state_dict(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Full (unsharded) Meta weights renamed and permuted for LlamaForCausalLM."""
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        layer = parts[1] if parts[0] == "layers" else None
        template = key if layer is None else key.replace(f"layers.{layer}.", "layers.{}.", 1)
        if template not in META_TO_HF_NAMES:
            raise KeyError(f"{key} is not a Llama parameter")
        if template.endswith("wq.weight"):
            tensor = interleaved_to_halves(tensor, args.n_heads)
        elif template.endswith("wk.weight"):
            tensor = interleaved_to_halves(tensor, args.n_kv_heads)
        out[META_TO_HF_NAMES[template].format(layer)] = tensor
    return out
