"""Chat with an instruction-tuned Llama 3 model, or without --ckpt_dir with the small bundled demo model
(SmolLM2-135M-Instruct, converted on first use).

    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir Meta-Llama-3-8B-Instruct/
    python example_chat_completion.py --ckpt_dir Meta-Llama-3-8B-Instruct/
    python example_chat_completion.py
"""

from typing import List, Optional

from llama import Dialog, Llama
from llama.command import print_streams, run_cli
from llama.demo import demo_checkpoint_dir

# The demo model often rambles on until the context is full; cap its replies.
DEMO_MAX_GEN_LEN = 128


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    speculate: Optional[str] = None,
):
    """Dialogs are lists of {"role", "content"} messages; the model writes the next assistant message.
    Without `ckpt_dir`, chats with the demo model, replies capped at DEMO_MAX_GEN_LEN tokens by default.
    `--speculate lookup` (or a draft model's directory) decodes speculatively, as in Llama.build."""
    if ckpt_dir is None:
        ckpt_dir = str(demo_checkpoint_dir())
        max_gen_len = DEMO_MAX_GEN_LEN if max_gen_len is None else max_gen_len
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
        speculate=speculate,
    )
    dialogs: List[Dialog] = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "user", "content": "I am going to Paris, what should I see?"},
            {
                "role": "assistant",
                "content": "Paris, the capital of France, is known for its stunning architecture, art museums, "
                "historical landmarks, and romantic atmosphere. The Eiffel Tower, the Louvre and "
                "Notre-Dame Cathedral are among its most famous sights.",
            },
            {"role": "user", "content": "What is so great about #1?"},
        ],
        [
            {"role": "system", "content": "Always answer with Haiku"},
            {"role": "user", "content": "I am going to Paris, what should I see?"},
        ],
        [
            {"role": "system", "content": "Always answer with emojis"},
            {"role": "user", "content": "How to go from Beijing to NY?"},
        ],
    ]
    for start in range(0, len(dialogs), max_batch_size):
        batch = dialogs[start : start + max_batch_size]
        stream = generator.stream_chat(batch, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        headers = [
            "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in dialog) + "> Assistant: " for dialog in batch
        ]
        print_streams(stream, headers)


if __name__ == "__main__":
    run_cli(main)
