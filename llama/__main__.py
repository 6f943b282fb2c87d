"""`python -m llama <command>`: the same as the `llama` command (see llama.cli)."""

from .cli import main

if __name__ == "__main__":
    main()
