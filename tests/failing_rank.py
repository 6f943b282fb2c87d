"""A generation job whose rank 1 fails: `torchrun ... failing_rank.py CKPT_DIR raise|exit`."""

import os
import sys

from llama import Llama


def main(ckpt_dir: str, how: str) -> None:
    generator = Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=1, dtype="float32", device="cpu")
    if int(os.environ["RANK"]) == 1:
        forward, calls = generator.model.forward_batch, []

        def failing_forward(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                if how == "exit":
                    os._exit(7)
                raise RuntimeError("rank 1 failed on purpose")
            return forward(*args, **kwargs)

        generator.model.forward_batch = failing_forward
    generator.text_completion(["Once upon a time"], temperature=0, max_gen_len=40)


if __name__ == "__main__":
    main(*sys.argv[1:])
