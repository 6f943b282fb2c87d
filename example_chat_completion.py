"""Chat with an instruction-tuned Llama 3 model.

    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir Meta-Llama-3-8B-Instruct/
    python example_chat_completion.py --ckpt_dir Meta-Llama-3-8B-Instruct/
"""

from typing import List, Optional

from llama import Dialog, Llama
from llama.cli import run_cli


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
):
    """Dialogs are lists of {"role", "content"} messages; the model writes the next assistant message."""
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
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
        results = generator.chat_completion(batch, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        for dialog, result in zip(batch, results):
            for message in dialog:
                print(f"{message['role'].capitalize()}: {message['content']}\n")
            print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
            print("\n==================================\n")


if __name__ == "__main__":
    run_cli(main)
