"""Servers for tests: the app on an in-process uvicorn thread, or `llama serve` as a process, on free ports."""

import socket
import subprocess
import threading
import time
from typing import Optional

import httpx
import uvicorn

from llama.generation import Llama
from llama.server import EngineThread, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessServer:
    """`generator` served on 127.0.0.1 from threads of this process, until `close`."""

    def __init__(self, generator: Llama, **app_options):
        self.generator = generator
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine_thread = EngineThread(generator.engine, distributed=False)
        self.engine_thread.start()
        app = create_app(generator, model_name="test-model", **app_options)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine_thread.stop()
        self.engine_thread.join(timeout=10)


def wait_until_healthy(url: str, process: Optional[subprocess.Popen] = None, timeout: float = 180) -> None:
    """Poll `url`/health until it answers 200; fail early if `process` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy in {timeout} s")
