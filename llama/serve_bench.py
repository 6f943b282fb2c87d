"""`llama bench_serve`: this repo's OpenAI-compatible server (`llama serve`) under concurrent streaming clients, and
on request llama.cpp's (llama-cpp-python's `llama_cpp.server`) on the same weights in the same precision.

Each system's server runs as a subprocess on 127.0.0.1 and a free port, from its first answer until its figures
are taken (then SIGINT, and a kill if it lingers). Clients use the official `openai` package: streamed chat
completions at temperature 0, --max_tokens each, every prompt distinct. Figures, medians over --reps:

- for each number of concurrent clients: generated tokens/s of all clients together (tokens from the stream's
  usage where the server sends it, else one per content chunk) and the median and p90 time to first token;
- a long prompt mid-run: 4 streams run, then a prompt of --long_prompt_tokens arrives; the running streams'
  longest gap between two tokens while it waits for its first token, over their median gap outside that window;
- prefix reuse: a chat with a system prompt of --system_prompt_tokens; the time to first token of its second turn
  (the first turn, the reply and a new question) over that of its first;
- how the server answers a malformed request, whether it has GET /metrics, whether its stream carries usage.
"""

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .bench import (
    GGUF_FILE_TYPES, _installed, _ratio, _version, check_installed, machine, machine_line, summarize, table_head,
)
from .checkpoint import write_atomically
from .demo import demo_checkpoint_dir
from .gguf_export import export_gguf
from .tokenizer import Tokenizer

SYSTEMS = ("ours", "llama.cpp")
SERVER_PACKAGES = {"llama.cpp": ("llama_cpp", "pip install 'llama-cpp-python[server]'")}
DTYPES = ("float32", "bfloat16")
CONTEXT = 4096  # both servers' context, in tokens
SLOTS = 8  # ours: requests that run together (--max_batch_size)
MAX_CLIENTS = 64
MID_RUN_STREAMS = 4
CHAT_OVERHEAD = 64  # tokens a prompt takes beyond its long text: chat headers and the question
STARTUP_TIMEOUT_S = 600
STOP_TIMEOUT_S = 15
TOPICS = (
    "a lighthouse keeper", "a river in spring", "the first train to the coast", "a clockmaker's apprentice",
    "a storm over the harbour", "a garden on a rooftop", "the night market", "an old map", "a mountain village",
    "a lost violin", "the last bookshop", "a winter orchard",
)
WORDS = (
    "the house river light morning stone garden window road city night water music paper table winter field "
    "market bridge letter forest summer people story voice school friend mountain evening animal journey "
    "harbour kitchen village station shadow silver golden quiet little ancient bright gentle careful walked "
    "found opened carried listened remembered painted"
).split()


@dataclass
class Stream:
    """One streamed chat completion as its client saw it, filled while it arrives: when it was sent, when each
    content chunk came, when it ended, its text, and the completion tokens of its usage (None without usage)."""

    sent: float = 0.0
    arrivals: List[float] = field(default_factory=list)
    ended: float = 0.0
    text: str = ""
    usage_tokens: Optional[int] = None

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def tokens(self) -> int:
        return len(self.arrivals) if self.usage_tokens is None else self.usage_tokens

    def gaps(self) -> List[Tuple[float, float]]:
        """(arrival, next arrival) of each pair of consecutive content chunks."""
        return list(zip(self.arrivals, self.arrivals[1:]))


# ---------------------------------------------------------------------------------------------------------------
# Servers

def free_port() -> int:
    """A TCP port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ours_command(config: dict, port: int) -> Tuple[List[str], Dict[str, str]]:
    """`llama serve` for the benchmark, and its environment (torch's threads)."""
    command = [
        sys.executable, "-m", "llama", "serve", "--ckpt_dir", config["ckpt_dir"], "--port", str(port),
        "--max_batch_size", str(SLOTS), "--max_seq_len", str(CONTEXT), "--dtype", config["dtype"], "--device", "cpu",
    ]
    return command, {"OMP_NUM_THREADS": str(config["threads"])}


def _llama_cpp_command(config: dict, port: int) -> Tuple[List[str], Dict[str, str]]:
    """llama-cpp-python's server on the GGUF export. It serves one request at a time (it has no parallel slots):
    `--interrupt_requests False` queues a request arriving meanwhile instead of cutting the running stream short,
    and `--logits_all False` computes a prompt's last logits only, as ours does."""
    threads = str(config["threads"])
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", config["gguf_path"], "--host", "127.0.0.1",
        "--port", str(port), "--n_ctx", str(CONTEXT), "--n_threads", threads, "--n_threads_batch", threads,
        "--interrupt_requests", "False", "--logits_all", "False", "--verbose", "False",
    ]
    return command, {}


# system -> (its server's command and environment, the path that answers once it is ready)
SERVERS = {"ours": (_ours_command, "/health"), "llama.cpp": (_llama_cpp_command, "/v1/models")}


def http_status(url: str, body: Optional[dict] = None) -> Optional[int]:
    """The HTTP status `url` answers to a GET, or to a POST of `body` as JSON; None if nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Inside, SIGTERM (from `kill` or `timeout`) raises SystemExit as Ctrl-C raises KeyboardInterrupt, so that
    `finally` blocks run; in the main thread only, where Python handles signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def running_server(command: List[str], *, env: Dict[str, str], ready_url: str, log_path: Path) -> Iterator[None]:
    """Start `command` (its output to `log_path`), wait until `ready_url` answers 200, and stop it on leaving,
    errors, Ctrl-C and SIGTERM included."""
    with sigterm_as_exit():
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
            )
        try:
            wait_until_ready(process, ready_url, log_path)
            yield
        finally:
            stop_server(process)


def wait_until_ready(process: subprocess.Popen, ready_url: str, log_path: Path) -> None:
    """Until `ready_url` answers 200; an error with the end of `log_path` if `process` exits first or
    STARTUP_TIMEOUT_S pass."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while http_status(ready_url) != 200:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited (status {process.returncode}) before answering:\n"
                               f"{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not answer {ready_url} in {STARTUP_TIMEOUT_S} s:\n{_log_tail(log_path)}")
        time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    """SIGINT, then a kill after STOP_TIMEOUT_S (or on a second Ctrl-C): the server never outlives the benchmark."""
    try:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------------------------------
# Workloads

def user_turn(text: str) -> List[dict]:
    return [{"role": "user", "content": text}]


def story_prompt(tag: str, index: int) -> str:
    """A distinct request for each `tag` (workload and repetition) and client `index`."""
    return f"Request {tag}-{index}: write a long story about {TOPICS[index % len(TOPICS)]}, in many details."


def filler_text(tokenizer: Tokenizer, n_tokens: int, seed: int) -> str:
    """`n_tokens` tokens (as `tokenizer` counts them) of everyday words, different for each `seed`."""
    rng = random.Random(seed)
    words = " ".join(rng.choice(WORDS) for _ in range(n_tokens))  # a word is a token or more
    return tokenizer.decode(tokenizer.encode(words, bos=False, eos=False)[:n_tokens])


async def stream_chat(client, model: str, messages: List[dict], *, max_tokens: int,
                      on_arrival: Optional[Callable[[Stream], None]] = None) -> Stream:
    """Stream one chat completion at temperature 0, asking for usage in the stream; `on_arrival(record)` is
    called after each content chunk."""
    record = Stream()
    record.sent = time.perf_counter()
    chunks = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in chunks:
        arrived = time.perf_counter()
        if chunk.usage is not None:
            record.usage_tokens = chunk.usage.completion_tokens
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content:
            record.arrivals.append(arrived)
            record.text += content
            if on_arrival is not None:
                on_arrival(record)
    record.ended = time.perf_counter()
    if not record.arrivals:
        raise RuntimeError(f"the server streamed no text for {messages[-1]['content'][:60]!r}")
    return record


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value at least `fraction` of `values` do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * fraction) - 1)]


async def concurrent_clients(client, model: str, *, clients: int, max_tokens: int, tag: str) -> List[Stream]:
    """`clients` streams started together, each with its own prompt."""
    return await asyncio.gather(*(
        stream_chat(client, model, user_turn(story_prompt(tag, i)), max_tokens=max_tokens) for i in range(clients)
    ))


def client_figures(streams: List[Stream], clients: int) -> Dict[str, float]:
    """Generated tokens/s of all `streams` together (first sent to last ended), median and p90 time to first
    token."""
    elapsed = max(s.ended for s in streams) - min(s.sent for s in streams)
    ttfts = [s.ttft for s in streams]
    return {
        f"tok_s_{clients}": sum(s.tokens for s in streams) / elapsed,
        f"ttft_median_s_{clients}": statistics.median(ttfts),
        f"ttft_p90_s_{clients}": percentile(ttfts, 0.9),
    }


async def long_prompt_mid_run(client, model: str, *, max_tokens: int, long_text: str, tag: str) -> Dict[str, float]:
    """MID_RUN_STREAMS streams, then, as soon as one has a quarter of its tokens (two at least), a request with
    `long_text`; the running streams' gaps between tokens while it waits for its first token (see stall_figures)."""
    started = asyncio.Event()

    def watch(stream: Stream) -> None:
        if len(stream.arrivals) >= max(2, max_tokens // 4):
            started.set()

    running = asyncio.gather(*(
        stream_chat(client, model, user_turn(story_prompt(tag, i)), max_tokens=max_tokens, on_arrival=watch)
        for i in range(MID_RUN_STREAMS)
    ))
    waiting = asyncio.ensure_future(started.wait())
    await asyncio.wait([waiting, running], return_when=asyncio.FIRST_COMPLETED)  # `running` first: failed or ended early
    waiting.cancel()
    long = await stream_chat(client, model, user_turn(long_text + "\nWhich word comes most often above?"),
                             max_tokens=max_tokens)
    return {**stall_figures(await running, long.sent, long.arrivals[0]), "mid_run_long_ttft_s": long.ttft}


def stall_figures(running: List[Stream], start: float, end: float) -> Dict[str, Optional[float]]:
    """The longest gap between two tokens of the `running` streams that overlaps the window `start`-`end`, their
    median gap outside it, and longest / median (None where the window or the rest held no gap)."""
    gaps = [(b - a, b > start and a < end) for s in running for a, b in s.gaps()]
    inside = [gap for gap, overlaps in gaps if overlaps]
    outside = [gap for gap, overlaps in gaps if not overlaps]
    longest = max(inside) if inside else None
    median = statistics.median(outside) if outside else None
    return {"mid_run_longest_gap_s": longest, "mid_run_median_gap_s": median,
            "mid_run_gap_ratio": _ratio(longest, median)}


async def prefix_reuse(client, model: str, *, max_tokens: int, system_text: str) -> Dict[str, float]:
    """A chat's first turn under the long `system_text`, then its second turn (the first, the reply and a new
    question): both times to first token and second / first."""
    first_turn = [{"role": "system", "content": system_text},
                  {"role": "user", "content": "Which words of the text above are about water?"}]
    first = await stream_chat(client, model, first_turn, max_tokens=max_tokens)
    second_turn = [*first_turn, {"role": "assistant", "content": first.text},
                   {"role": "user", "content": "And which are about light?"}]
    second = await stream_chat(client, model, second_turn, max_tokens=max_tokens)
    return {"prefix_first_ttft_s": first.ttft, "prefix_second_ttft_s": second.ttft,
            "prefix_ratio": second.ttft / first.ttft}


# ---------------------------------------------------------------------------------------------------------------
# One system, all of its figures

async def measure(base_url: str, config: dict, tokenizer: Tokenizer, system: str) -> Tuple[List[dict], dict]:
    """Every repetition's figures on the server at `base_url`, and notes on how its streams counted tokens."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=STARTUP_TIMEOUT_S)
    async with client:
        model = (await client.models.list()).data[0].id
        await stream_chat(client, model, user_turn("Say hello."), max_tokens=config["max_tokens"])  # warm-up
        reps, streams = [], []
        for rep in range(config["reps"]):
            figures, batches = await measure_rep(client, model, config, tokenizer, rep=rep, system=system)
            reps.append(figures)
            streams += batches
    with_usage = all(s.usage_tokens is not None for s in streams)
    notes = {
        "model": model,
        "stream_usage": with_usage,
        "tokens_counted_from": "usage" if with_usage else "content chunks",
        "usage_completion_tokens": sum(s.usage_tokens for s in streams) if with_usage else None,
        "content_chunks": sum(len(s.arrivals) for s in streams),
    }
    return reps, notes


async def measure_rep(client, model: str, config: dict, tokenizer: Tokenizer, *, rep: int,
                      system: str) -> Tuple[dict, List[Stream]]:
    """One repetition's figures of every workload, and the streams of the concurrent clients."""
    max_tokens, figures, streams = config["max_tokens"], {}, []
    for clients in config["clients"]:
        print(f"{system}: rep {rep + 1}/{config['reps']}, {clients} client(s)", file=sys.stderr, flush=True)
        batch = await concurrent_clients(client, model, clients=clients, max_tokens=max_tokens, tag=f"{rep}.{clients}")
        figures.update(client_figures(batch, clients))
        streams += batch
    print(f"{system}: rep {rep + 1}/{config['reps']}, long prompt mid-run, prefix reuse", file=sys.stderr, flush=True)
    long_text = filler_text(tokenizer, config["long_prompt_tokens"], seed=2 * rep)
    figures.update(await long_prompt_mid_run(client, model, max_tokens=max_tokens, long_text=long_text, tag=f"{rep}.m"))
    system_text = filler_text(tokenizer, config["system_prompt_tokens"], seed=2 * rep + 1)
    figures.update(await prefix_reuse(client, model, max_tokens=max_tokens, system_text=system_text))
    return figures, streams


def http_notes(base_url: str, model: str) -> Dict[str, Optional[int]]:
    """The status codes of a malformed request (temperature "hot") and of GET /metrics."""
    malformed = {"model": model, "messages": user_turn("Hi."), "temperature": "hot"}
    return {
        "malformed_request_status": http_status(base_url + "/v1/chat/completions", malformed),
        "metrics_status": http_status(base_url + "/metrics"),
    }


def run_system(system: str, config: dict, tokenizer: Tokenizer, log_dir: Path) -> dict:
    """Start `system`'s server, take its figures and notes, stop it."""
    make_command, ready_path = SERVERS[system]
    port = free_port()
    command, env = make_command(config, port)
    base_url = f"http://127.0.0.1:{port}"
    print(f"{system}: starting {' '.join(command)}", file=sys.stderr, flush=True)
    with running_server(command, env=env, ready_url=base_url + ready_path, log_path=log_dir / f"{system}.log"):
        reps, notes = asyncio.run(measure(base_url, config, tokenizer, system))
        notes.update(http_notes(base_url, notes["model"]))
    return {"server": command, "env": env, "reps": reps, "summary": summarize(reps), "notes": notes}


# ---------------------------------------------------------------------------------------------------------------
# Options, table, report

def _items(option) -> list:
    """An option's items: "a,b" -> ["a", "b"]; fire's tuple or list as it is; anything else as the only one."""
    if isinstance(option, str):
        return option.split(",")
    return list(option) if isinstance(option, (list, tuple)) else [option]


def parse_names(systems) -> List[str]:
    """"ours,llama.cpp" (or a list) -> ["ours", "llama.cpp"], each a known system."""
    names = _items(systems)
    for name in names:
        if name not in SYSTEMS:
            raise ValueError(f"unknown system {name!r} in --systems: use {' or '.join(SYSTEMS)}, comma-separated")
    return list(dict.fromkeys(names))


def parse_clients(clients) -> List[int]:
    """"1,2,4,8" (or fire's (1, 2, 4, 8), or 4) -> [1, 2, 4, 8]: client counts from 1 to MAX_CLIENTS."""
    counts = []
    for item in _items(clients):
        text = str(item).strip()
        if isinstance(item, bool) or not text.isdigit() or not 1 <= int(text) <= MAX_CLIENTS:
            raise ValueError(
                f"--clients must list numbers of clients from 1 to {MAX_CLIENTS}, e.g. 1,2,4,8: got {clients!r}"
            )
        counts.append(int(text))
    return list(dict.fromkeys(counts))


def check_counts(*, max_tokens, reps, long_prompt_tokens, system_prompt_tokens, threads) -> None:
    """One-line errors for counts that are not positive integers or do not fit the servers' CONTEXT."""
    counts = {"max_tokens": max_tokens, "reps": reps, "long_prompt_tokens": long_prompt_tokens,
              "system_prompt_tokens": system_prompt_tokens, "threads": threads or 1}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    if max_tokens < 3:
        raise ValueError("--max_tokens must be 3 or more: the long prompt arrives after two tokens, before the last")
    if max(long_prompt_tokens + max_tokens, system_prompt_tokens + 2 * max_tokens) + 2 * CHAT_OVERHEAD > CONTEXT:
        raise ValueError(f"--long_prompt_tokens or --system_prompt_tokens with --max_tokens do not fit the servers' "
                         f"{CONTEXT}-token context: make them smaller")


def figure_labels(clients: List[int]) -> Dict[str, str]:
    """Each figure's key and its label in the table, in the table's order."""
    labels = {}
    for n in clients:
        labels[f"tok_s_{n}"] = f"{n} client(s): generated tok/s, all together"
        labels[f"ttft_median_s_{n}"] = f"{n} client(s): median time to first token (s)"
        labels[f"ttft_p90_s_{n}"] = f"{n} client(s): p90 time to first token (s)"
    return {
        **labels,
        "mid_run_longest_gap_s": "long prompt mid-run: running streams' longest gap (s)",
        "mid_run_median_gap_s": "long prompt mid-run: their median gap outside the window (s)",
        "mid_run_gap_ratio": "long prompt mid-run: longest / median gap",
        "mid_run_long_ttft_s": "long prompt mid-run: the long prompt's time to first token (s)",
        "prefix_first_ttft_s": "prefix reuse: first turn's time to first token (s)",
        "prefix_second_ttft_s": "prefix reuse: second turn's time to first token (s)",
        "prefix_ratio": "prefix reuse: second / first",
    }


NOTE_LABELS = {
    "malformed_request_status": 'malformed request (temperature "hot"): HTTP status',
    "metrics_status": "GET /metrics: HTTP status",
    "tokens_counted_from": "tokens counted from",
}


def _cell(value) -> str:
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown_table(report: dict) -> str:
    """The report as a markdown table: a row per figure (medians), a column per system, ours / llama.cpp."""
    m, config, systems = report["machine"], report["config"], list(report["systems"])
    header = [f"figure (median of {config['reps']})", *systems, *(["ours / llama.cpp"] if report["ratios"] else [])]
    lines = table_head(
        f"{machine_line(m, config['threads'])}, llama-cpp-python {m['llama_cpp_python']}; {config['dtype']}, "
        f"{config['max_tokens']} tokens per request, long prompt {config['long_prompt_tokens']} tokens, system "
        f"prompt {config['system_prompt_tokens']} tokens",
        header,
    )
    for key, label in figure_labels(config["clients"]).items():
        cells = [_cell(report["systems"][s]["summary"][key]["median"]) for s in systems]
        if report["ratios"]:
            ratio = report["ratios"][key]
            cells.append("–" if ratio is None else f"{ratio:.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in NOTE_LABELS.items():
        cells = [_cell(report["systems"][s]["notes"][key]) for s in systems]
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + " |" * bool(report["ratios"]))
    return "\n".join(lines)


def bench_serve(
    *,
    ckpt_dir: Optional[str] = None,
    systems="ours",
    dtype: str = "float32",
    clients="1,2,4,8",
    max_tokens: int = 64,
    reps: int = 1,
    long_prompt_tokens: int = 1500,
    system_prompt_tokens: int = 1000,
    threads: Optional[int] = None,
    out: Optional[str] = "bench-serve.json",
) -> None:
    """Benchmark `llama serve` under concurrent streaming clients, next to llama.cpp's server if asked.

    --systems ours,llama.cpp adds llama-cpp-python's server on a GGUF export of the same weights and --dtype. The
    demo model unless --ckpt_dir. Figures for each number of --clients, then for a --long_prompt_tokens prompt
    mid-run and a chat under a --system_prompt_tokens system prompt. Prints a table, writes a JSON report (--out)."""
    names, client_counts = parse_names(systems), parse_clients(clients)
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}: use {' or '.join(DTYPES)}")
    check_counts(max_tokens=max_tokens, reps=reps, long_prompt_tokens=long_prompt_tokens,
                 system_prompt_tokens=system_prompt_tokens, threads=threads)
    if not _installed("openai"):
        raise ValueError("bench_serve's clients need the openai package: pip install openai")
    check_installed(names, SERVER_PACKAGES)
    ckpt_dir = str(ckpt_dir or demo_checkpoint_dir())
    tokenizer = Tokenizer(str(Path(ckpt_dir) / "tokenizer.model"))
    config = {
        "ckpt_dir": ckpt_dir, "systems": names, "dtype": dtype, "clients": client_counts, "max_tokens": max_tokens,
        "reps": reps, "long_prompt_tokens": long_prompt_tokens, "system_prompt_tokens": system_prompt_tokens,
        "threads": threads or torch.get_num_threads(), "context": CONTEXT,
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="llama-bench-serve-") as tmp:
        if "llama.cpp" in names:
            gguf_path = Path(tmp) / f"model-{GGUF_FILE_TYPES[dtype]}.gguf"
            config["gguf_path"] = str(export_gguf(ckpt_dir, gguf_path, GGUF_FILE_TYPES[dtype]))
        for system in names:
            results[system] = run_system(system, config, tokenizer, Path(tmp))
    config.pop("gguf_path", None)
    medians = {s: {key: st["median"] for key, st in r["summary"].items()} for s, r in results.items()}
    report = {
        "machine": {**machine(), "llama_cpp_python": _version("llama_cpp"), "openai": _version("openai")},
        "config": config,
        "systems": results,
        "ratios": {key: _ratio(medians["ours"][key], medians["llama.cpp"][key]) for key in medians["ours"]}
        if {"ours", "llama.cpp"} <= set(results) else {},
    }
    print(markdown_table(report))
    if out:
        write_atomically(Path(out), lambda path: path.write_text(json.dumps(report, indent=2)))
