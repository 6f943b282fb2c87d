"""Running a command-line entry point: user mistakes end in a one-line error, not a traceback."""

import sys
from typing import Callable

import fire

from .checkpoint import CheckpointError


def run_cli(command: Callable) -> None:
    """`fire.Fire(command)`, printing `error: <message>` and exiting 1 on a mistake in the user's input."""
    try:
        fire.Fire(command)
    except (CheckpointError, ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
