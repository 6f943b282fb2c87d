"""Write a Meta checkpoint directory as one llama.cpp GGUF file (F32, F16, BF16, Q8_0 or Q4_0 weights), e.g. to run the
same weights in llama.cpp next to this repo (`python -m llama.bench --systems ours,llama.cpp`).

    python -m llama.convert to_gguf --ckpt_dir X --out_path model.gguf [--file_type q8_0]

GGUF keeps query/key rows in Meta's interleaved RoPE layout, so weights go as they are; the tokenizer goes as
GPT-2 style byte-level tokens and merges. Norm weights and Llama 3.1's RoPE factors are always F32.
"""

from pathlib import Path
from typing import Dict, Union

import gguf
import numpy as np
import torch
from tiktoken.load import load_tiktoken_bpe
from tqdm import tqdm

from .bpe import PRETOKENIZER_PATTERNS, byte_level_text, merges_for_ranks
from .checkpoint import OUTPUT_KEY, CheckpointError, write_atomically
from .gguf_import import ARCHITECTURE, CONTROL_TOKEN, GLOBAL_TENSORS, LAYER_TENSORS, ROPE_FREQS_TENSOR
from .hf import CONTEXT_LENGTH, chat_template, export_source
from .model import ModelArgs, rope_frequencies
from .tokenizer import Tokenizer

FILE_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
NORMAL_TOKEN = 1  # llama.cpp's token type of ordinary vocabulary entries


def gguf_name(meta_name: str) -> str:
    """The GGUF tensor name of a Meta parameter name (the inverse of gguf_import.meta_name)."""
    for gguf_key, meta_key in GLOBAL_TENSORS.items():
        if meta_name == meta_key:
            return gguf_key
    _, layer, *rest = meta_name.split(".")
    module = ".".join(rest).removesuffix(".weight")
    short = next(key for key, value in LAYER_TENSORS.items() if value == module)
    return f"blk.{layer}.{short}.weight"


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer_path: Path, tokenizer: Tokenizer) -> None:
    spec = tokenizer.spec
    pre = next((name for name, pattern in PRETOKENIZER_PATTERNS.items() if pattern == spec.pattern), None)
    if pre is None:
        raise CheckpointError(f"{tokenizer_path}'s pre-tokenizer has no llama.cpp name: this tokenizer cannot export")
    ranks = load_tiktoken_bpe(str(tokenizer_path))
    text = byte_level_text(ranks, spec.n_words)
    by_id = {**{ranks[token]: piece for token, piece in text.items()}, **{i: name for name, i in spec.special_tokens.items()}}
    missing = [i for i in range(spec.n_words) if i not in by_id]
    if missing:
        raise CheckpointError(f"{tokenizer_path} has no token for id {missing[0]}: this tokenizer cannot export")
    special = set(spec.special_tokens.values())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([by_id[i] for i in range(spec.n_words)])
    writer.add_token_types([CONTROL_TOKEN if i in special else NORMAL_TOKEN for i in range(spec.n_words)])
    writer.add_token_merges([f"{left} {right}" for left, right in merges_for_ranks(text, ranks)])
    writer.add_add_bos_token(spec.bos_token is not None)
    if spec.bos_token is not None:
        writer.add_bos_token_id(spec.special_tokens[spec.bos_token])
    writer.add_eos_token_id(spec.special_tokens[spec.eos_token])
    writer.add_pad_token_id(spec.special_tokens[spec.pad_token])
    writer.add_chat_template(chat_template(spec))


def _add_hyperparameters(writer: gguf.GGUFWriter, args: ModelArgs, file_type: gguf.LlamaFileType) -> None:
    writer.add_context_length(CONTEXT_LENGTH[args.use_scaled_rope])
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    writer.add_file_type(file_type)


def _encoded(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """`tensor` in GGUF's encoding: norms (1-D) always F32, matrices in `qtype`."""
    data = tensor.float().numpy()
    return data if tensor.dim() == 1 else gguf.quants.quantize(data, qtype)


def export_gguf(ckpt_dir: Union[str, Path], out_path: Union[str, Path], file_type: str = "f16") -> Path:
    """Write a Meta checkpoint as one GGUF file for llama.cpp.

    Any number of shards; the matrices in --file_type (f32, f16, bf16, q8_0 or q4_0). Returns `out_path`."""
    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown --file_type {file_type!r}: use one of {', '.join(FILE_TYPES)}")
    qtype, llama_file_type = FILE_TYPES[file_type]
    ckpt_dir, out_path = Path(ckpt_dir), Path(out_path)
    checkpoint, tokenizer = export_source(ckpt_dir)
    args = checkpoint.args
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if args.dim % block or args.ffn_hidden_dim % block:
        raise CheckpointError(f"{file_type} needs rows whose length divides by {block}: use --file_type f16")

    # A tied output projection is left out: llama.cpp then uses the embedding matrix, as this repo does.
    layout = {key: value for key, value in checkpoint.layout.items() if not (checkpoint.tied_output and key == OUTPUT_KEY)}

    def read(key: str) -> torch.Tensor:
        return checkpoint.read(key, 0, 1, torch.float32, torch.device("cpu"))

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(path, ARCHITECTURE)
        _add_hyperparameters(writer, args, llama_file_type)
        _add_tokenizer(writer, ckpt_dir / "tokenizer.model", tokenizer)
        extra: Dict[str, torch.Tensor] = {}
        if args.use_scaled_rope:  # llama.cpp divides each frequency by its factor
            extra[ROPE_FREQS_TENSOR] = rope_frequencies(args, scaled=False) / rope_frequencies(args)
        for name, tensor in extra.items():
            writer.add_tensor_info(name, tensor.shape, np.dtype(np.float32), tensor.numel() * 4)
        for key, (shape, _) in layout.items():
            sample = _encoded(torch.zeros(1, *shape[1:]) if len(shape) > 1 else torch.zeros(shape), qtype)
            byte_shape = (shape[0], *sample.shape[1:]) if len(shape) > 1 else sample.shape
            nbytes = sample.nbytes * (shape[0] if len(shape) > 1 else 1)
            raw_dtype = None if sample.dtype in (np.float32, np.float16) else qtype
            writer.add_tensor_info(gguf_name(key), byte_shape, sample.dtype, nbytes, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in extra.values():
            writer.write_tensor_data(tensor.float().numpy())
        for key in tqdm(layout, desc="exporting", unit="tensor"):
            writer.write_tensor_data(_encoded(read(key), qtype))
        writer.close()

    write_atomically(out_path, write)
    return out_path
