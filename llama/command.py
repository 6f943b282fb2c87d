"""Command-line plumbing: user mistakes end in a one-line error, not a traceback; streams print in order."""

import functools
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

import fire

from .checkpoint import CheckpointError
from .generation import in_prompt_order


def run_cli(command: object, *, name: Optional[str] = None) -> None:
    """`fire.Fire(command)`, printing `error: <message>` and exiting 1 on a mistake in the user's input."""
    try:
        fire.Fire(command, name=name, serialize=_unprinted_paths)
    except (CheckpointError, ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _unprinted_paths(result: object) -> object:
    """What fire prints of a command's result: not the path a writer returns (its command says where it wrote)."""
    return None if isinstance(result, Path) else result


def announcing(write: Callable[..., Path], what: str) -> Callable[..., None]:
    """`write` as a command that prints where it wrote `what`."""

    @functools.wraps(write)
    def command(*args, **kwargs) -> None:
        print(f"wrote {what} to {write(*args, **kwargs)}")

    return command


def print_streams(stream: Iterable[Tuple[int, str]], headers: List[str]) -> None:
    """Print the texts of a batch's `stream` one after another, each after its header and live once it is
    its turn (the batch is still generated together)."""
    shown = -1
    for index, text in in_prompt_order(stream, len(headers)):
        if index != shown:
            shown = index
            print(headers[index], end="")
        print(text, end="", flush=True)
        if not text:
            print("\n\n==================================\n")
