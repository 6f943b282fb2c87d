"""Greedy tokens for a fixed batch of prompts, as JSON: `[torchrun ...] greedy_tokens.py CKPT_DIR OUT.json [QUANTIZE]`.

Each rank also writes OUT.json.tied.RANK: 1 if its output projection is the embedding matrix itself, else 0."""

import json
import os
import sys

from llama import Llama

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3,"]


def main(ckpt_dir: str, out_path: str, quantize: str = "") -> None:
    generator = Llama.build(
        ckpt_dir, max_seq_len=64, max_batch_size=len(PROMPTS), dtype="float32", device="cpu", quantize=quantize or None
    )
    prompt_tokens = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, _ = generator.generate(prompt_tokens, max_gen_len=16, temperature=0)
    rank = int(os.environ.get("RANK", 0))
    with open(f"{out_path}.tied.{rank}", "w") as f:
        f.write(str(int(generator.model.output_is_tied())))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(tokens, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
