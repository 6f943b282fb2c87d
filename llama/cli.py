"""`llama <command>` (also `python -m llama <command>`): every tool of this repo under one command."""

from .bench import bench
from .bench_speculation import bench_speculation
from .chat import chat
from .command import run_cli
from .convert import COMMANDS as CONVERSIONS
from .eval import evaluate
from .quantize import quantize
from .reshard import reshard
from .serve import serve
from .serve_bench import bench_serve
from .soak import soak

COMMANDS = {
    "chat": chat,
    "serve": serve,
    "convert": CONVERSIONS,
    "reshard": reshard,
    "quantize": quantize,
    "eval": evaluate,
    "bench": bench,
    "bench_serve": bench_serve,
    "bench_speculation": bench_speculation,
    "soak": soak,
}


def main() -> None:
    run_cli(COMMANDS, name="llama")


if __name__ == "__main__":
    main()
