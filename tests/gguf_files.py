"""Small random Llama models written as GGUF files, for tests."""

from pathlib import Path

import gguf
import numpy as np
from tokenizers import pre_tokenizers

Q = gguf.GGMLQuantizationType
CONTROL, NORMAL = 3, 1

DIM, HEADS, KV_HEADS, LAYERS, FFN = 256, 4, 2, 2, 512
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = SPECIAL + sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
PLAIN_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Byte offsets of the float16 scales in each 256-value block of the K-quants (ggml's block_q6_K, block_q4_K).
K_QUANT_SCALES = {Q.Q6_K: (208,), Q.Q4_K: (0, 2)}


def gguf_metadata(arch: str = "llama", ffn: int = FFN) -> dict:
    return {
        f"{arch}.block_count": LAYERS,
        f"{arch}.context_length": 512,
        f"{arch}.embedding_length": DIM,
        f"{arch}.feed_forward_length": ffn,
        f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS,
        f"{arch}.rope.freq_base": 500000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.dimension_count": DIM // HEADS,
        f"{arch}.vocab_size": len(TOKENS),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": [CONTROL] * len(SPECIAL) + [NORMAL] * (len(TOKENS) - len(SPECIAL)),
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": PLAIN_CHATML,
    }


def random_tensors(ffn: int = FFN, tied: bool = True, seed: int = 0) -> dict:
    """GGUF-named float32 weights (rows, columns) of a small random Llama."""
    rng = np.random.default_rng(seed)
    head_dim = DIM // HEADS
    shapes = {"token_embd.weight": (len(TOKENS), DIM), "output_norm.weight": (DIM,)}
    if not tied:
        shapes["output.weight"] = (len(TOKENS), DIM)
    for i in range(LAYERS):
        shapes.update({
            f"blk.{i}.attn_q.weight": (HEADS * head_dim, DIM), f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, DIM),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, DIM), f"blk.{i}.attn_output.weight": (DIM, HEADS * head_dim),
            f"blk.{i}.ffn_gate.weight": (ffn, DIM), f"blk.{i}.ffn_down.weight": (DIM, ffn),
            f"blk.{i}.ffn_up.weight": (ffn, DIM), f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.ffn_norm.weight": (DIM,),
        })  # fmt: skip
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def random_k_blocks(shape, qtype) -> np.ndarray:
    """Random K-quant blocks for a (rows, columns) matrix, with small positive scales so values stay finite."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = np.random.default_rng(rows * cols).integers(0, 256, (rows * cols // block_size, block_bytes), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype]:
        blocks[:, offset : offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, qtype=Q.F32, metadata: dict = None, tensors: dict = None, arch: str = "llama") -> Path:
    """A GGUF file with the given metadata and tensors; matrices stored as `qtype`, vectors as F32."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (gguf_metadata(arch) if metadata is None else metadata).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array in (random_tensors() if tensors is None else tensors).items():
        if array.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(name, array)
        elif qtype == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        elif qtype in K_QUANT_SCALES:
            writer.add_tensor(name, random_k_blocks(array.shape, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
