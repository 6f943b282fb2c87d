"""`llama serve`: the OpenAI-compatible server (llama.server) on one process or, under torchrun, on several."""

import os
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist
import uvicorn

from .engine import PREFILL_CHUNK
from .generation import Llama
from .server import EngineThread, create_app, follow
from .speculation import DRAFT_TOKENS, LOOKUP


def serve(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_seq_len: int = 4096,
    max_queue: int = 64,
    prefill_chunk: int = PREFILL_CHUNK,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    speculate: Optional[str] = None,
    speculate_tokens: int = DRAFT_TOKENS,
) -> None:
    """Serve a model over OpenAI's HTTP API (chat, completions, streaming), many clients at once.

    The demo model unless --ckpt_dir. --max_batch_size requests run together, --max_queue more wait. With
    --api_key (or LLAMA_API_KEY) /v1 needs `Authorization: Bearer <key>`. Binds to 127.0.0.1 unless --host.
    Under torchrun, rank 0 serves and every rank computes. --speculate lookup|DRAFT_DIR as in Llama.build."""
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"--port must be a port number, got {port!r}")
    if not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"--max_queue must be a non-negative integer, got {max_queue!r}")
    if speculate not in (None, LOOKUP) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("a draft model serves on one process only: use --speculate lookup under torchrun")
    if ckpt_dir is None:
        from .demo import demo_checkpoint_dir

        ckpt_dir = str(demo_checkpoint_dir())
    generator = Llama.build(
        ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=device,
        dtype=dtype, quantize=quantize, prefill_chunk=prefill_chunk, speculate=speculate,
        speculate_tokens=speculate_tokens,
    )
    generator.engine.max_queue = max_queue
    distributed = dist.get_world_size() > 1
    if dist.get_rank() > 0:
        follow(generator.engine)
        return
    app = create_app(generator, model_name=model_name or Path(ckpt_dir).resolve().name,
                     api_key=api_key or os.environ.get("LLAMA_API_KEY") or None)
    engine_thread = EngineThread(generator.engine, distributed=distributed)
    engine_thread.start()
    print(f"Serving on http://{host}:{port} (OpenAI API under /v1, a chat page at /)", file=sys.__stdout__, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    finally:
        engine_thread.stop()
        engine_thread.join()
