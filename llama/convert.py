"""Convert checkpoints between Meta's format, Hugging Face's and GGUF.

    python -m llama.convert from_gguf --gguf_path model.gguf --out_dir D [--dtype bfloat16]
    python -m llama.convert from_hf --hf_dir X --out_dir D [--dtype bfloat16]
    python -m llama.convert to_hf --ckpt_dir X --out_dir D [--dtype bfloat16] [--max_shard_bytes N]
    python -m llama.convert to_gguf --ckpt_dir X --out_path model.gguf [--file_type f16|f32|bf16|q8_0|q4_0]

from_gguf and from_hf write a Meta checkpoint directory (params.json, consolidated.00.pth, tokenizer.model,
tokenizer_spec.json unless the tokenizer is Meta's Llama 3 one, checklist.chk). to_hf writes a Hugging Face
directory (config.json, generation_config.json, model.safetensors or shards with an index, tokenizer.json,
tokenizer_config.json) that transformers, vLLM and other Hugging Face tools load. to_gguf writes one GGUF file
for llama.cpp (and tools built on it), its matrices in `--file_type` (default f16). `--dtype` defaults to the
source's (float32 for GGUF). The output directory must not exist or be empty; it appears only once complete,
so an interrupted conversion leaves nothing behind.
"""

from .command import announcing, run_cli
from .gguf_export import export_gguf
from .gguf_import import convert_gguf
from .hf import convert_hf, export_hf


COMMANDS = {
    "from_gguf": announcing(convert_gguf, "a Meta checkpoint"),
    "from_hf": announcing(convert_hf, "a Meta checkpoint"),
    "to_hf": announcing(export_hf, "a Hugging Face checkpoint"),
    "to_gguf": announcing(export_gguf, "a GGUF model"),
}

if __name__ == "__main__":
    run_cli(COMMANDS)
