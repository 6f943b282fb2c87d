"""Perplexity of a checkpoint on a text, in any dtype and with each quantization.

    llama eval [--ckpt_dir DIR] [--text FILE] [--dtype bfloat16] [--methods int8,int4] [--tokens 16384]
"""

import math
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .command import run_cli
from .demo import demo_checkpoint_dir
from .generation import Llama
from .model import Transformer
from .quantized_linear import QUANTIZATIONS, check_method


@torch.inference_mode()
def perplexity(model: Transformer, tokens: List[int], window: int) -> float:
    """Perplexity of `model` on `tokens`, scored in consecutive windows of `window` tokens (each window
    starts fresh, its first token is context only)."""
    if window < 2 or len(tokens) < 2:
        raise ValueError("perplexity needs a window and a text of at least 2 tokens")
    total, count = 0.0, 0
    for begin in range(0, len(tokens) - 1, window - 1):
        chunk = torch.tensor([tokens[begin : begin + window]])  # (1, up to window), at least 2 tokens
        logprobs = torch.log_softmax(model.forward(chunk, 0), dim=-1)[0, :-1]  # (window - 1, vocab)
        total -= logprobs.gather(-1, chunk[0, 1:, None]).sum().item()
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def reference_text() -> str:
    """A fixed English text of about 450 KB that ships with Python: the language reference topics of pydoc."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"text file {path} not found: pass --text with an existing UTF-8 file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: pass --text with a UTF-8 file") from None


def evaluate(
    ckpt_dir: Optional[str] = None,
    text: Optional[str] = None,
    dtype: str = "bfloat16",
    methods: Sequence[str] = QUANTIZATIONS,
    tokens: int = 16384,
    window: int = 512,
) -> None:
    """Perplexity of a checkpoint on a text, in a dtype and with each quantization.

    The demo model unless --ckpt_dir; the first --tokens tokens of --text, else of a bundled English text; each
    quantization of --methods (empty for none) is compared with --dtype."""
    if isinstance(methods, str):
        methods = [m for m in methods.split(",") if m]
    for method in methods:
        check_method(method)
    source = _read_text(text) if text else reference_text()
    ckpt_dir = str(ckpt_dir or demo_checkpoint_dir())
    results, text_tokens = {}, None
    for method in [None, *methods]:
        generator = Llama.build(ckpt_dir, max_seq_len=window, max_batch_size=1, dtype=dtype, device="cpu", quantize=method)
        if text_tokens is None:  # the same tokenizer for every build
            text_tokens = generator.tokenizer.encode(source, bos=False, eos=False)[:tokens]
            if len(text_tokens) < tokens and not text:
                raise ValueError(f"the reference text has only {len(text_tokens)} tokens: ask for fewer")
        results[method or dtype] = perplexity(generator.model, text_tokens, window)
        del generator
    base = results[dtype]
    for name, value in results.items():
        print(f"{name}: perplexity {value:.4f} ({value / base - 1:+.2%} vs {dtype}) on {len(text_tokens)} tokens")


if __name__ == "__main__":
    run_cli(evaluate)
