"""`llama serve` as users start it: one process, and three under torchrun, whose rank dying ends the server."""

import concurrent.futures
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
from demo_fixtures import demo_cache, demo_ckpt  # noqa: F401
from servers import free_port, wait_until_healthy

from llama import Llama

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What do bees make?"]


def start(command, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLAMA_DIST_TIMEOUT_MIN": "2"}
    return subprocess.Popen(command + ["--port", str(port)], cwd=ROOT, env=env, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def answers(port: int, max_tokens: int = 16):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id

    def answer(question: str) -> str:
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              temperature=0, max_tokens=max_tokens).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:  # batched together
        return list(pool.map(answer, QUESTIONS))


def test_one_process_serves_and_stops_on_ctrl_c(tiny_ckpt):
    port = free_port()
    server = start([sys.executable, "-m", "llama", "serve", "--ckpt_dir", str(tiny_ckpt), "--max_seq_len", "64"],
                   port)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server)
        assert len(answers(port, max_tokens=2)) == 3
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        stop(server)


def test_bad_serve_options_are_one_line_errors():
    result = subprocess.run([sys.executable, "-m", "llama", "serve", "--port", "70000"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == "error: --port must be a port number, got 70000"


def test_three_ranks_speculating_answer_as_one_process_and_a_dead_rank_ends_the_server(demo_ckpt):  # noqa: F811
    generator = Llama.build(demo_ckpt, max_seq_len=256, max_batch_size=4, dtype="float32")
    expected = [r["generation"]["content"] for r in generator.chat_completion(
        [[{"role": "user", "content": q}] for q in QUESTIONS], temperature=0, max_gen_len=16)]
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    server = start(launcher + ["-m", "llama", "serve", "--ckpt_dir", str(demo_ckpt), "--max_seq_len", "256",
                               "--max_batch_size", "4", "--dtype", "float32", "--speculate", "lookup"], port)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server)
        assert answers(port) == expected
        rank_2 = [pid for pid in _children(server.pid) if _environ(pid).get("RANK") == "2"]
        assert len(rank_2) == 1
        os.kill(rank_2[0], signal.SIGKILL)
        assert server.wait(timeout=90) != 0
    finally:
        stop(server)


def _children(pid: int):
    """Every descendant process of `pid`."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            children = (task / "children").read_text().split()
            found += map(int, children)
            frontier += map(int, children)
    return found


def _environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
