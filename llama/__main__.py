"""`python -m llama chat ...`: the interactive chat (see llama.chat)."""

from .chat import chat
from .cli import run_cli

if __name__ == "__main__":
    run_cli({"chat": chat})
