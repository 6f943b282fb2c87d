"""Complete a few prompts with a pretrained Llama 3 model, or without --ckpt_dir with the small bundled demo
model (SmolLM2-135M-Instruct, converted on first use).

    torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir Meta-Llama-3-8B/
    python example_text_completion.py --ckpt_dir Meta-Llama-3-8B/
    python example_text_completion.py
"""

from typing import Optional

from llama import Llama
from llama.command import print_streams, run_cli
from llama.demo import demo_checkpoint_dir


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    speculate: Optional[str] = None,
):
    """Prompts are plain text the model continues; `tokenizer_path` defaults to ckpt_dir/tokenizer.model.
    Without `ckpt_dir`, uses the demo model. `--speculate lookup` (or a draft model's directory) decodes
    speculatively, as in Llama.build."""
    generator = Llama.build(
        ckpt_dir=ckpt_dir or demo_checkpoint_dir(),
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
        speculate=speculate,
    )
    prompts = [
        # For these prompts, the expected answer is the natural continuation of the prompt
        "I believe the meaning of life is",
        "Simply put, the theory of relativity states that ",
        """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
        # Few shot prompt (providing a few examples before asking the model to complete more);
        """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
    ]
    for start in range(0, len(prompts), max_batch_size):
        batch = prompts[start : start + max_batch_size]
        stream = generator.stream_text(batch, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        print_streams(stream, [f"{prompt}\n> " for prompt in batch])


if __name__ == "__main__":
    run_cli(main)
