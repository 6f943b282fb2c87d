"""Interactive chat in the terminal: `python -m llama chat [--ckpt_dir DIR]`.

Answers stream as they are generated. Commands: /reset forgets the conversation, /system <text> sets the
system prompt (and starts over), /exit quits (so does Ctrl-D). Ctrl-C stops the current answer. When the
conversation outgrows the context, the oldest turns are dropped; the system prompt stays.
"""

import signal
from typing import List, Optional

import torch.distributed as dist

from .chat_format import Message
from .generation import Llama
from .optimize import warm_up_decoding
from .speculation import DRAFT_TOKENS

HELP = "Commands: /reset, /system <text>, /exit. Ctrl-C stops an answer, Ctrl-D quits."


class ChatSession:
    """A conversation with a model, kept within its context window."""

    def __init__(self, generator: Llama, system: Optional[str] = None, max_gen_len: int = 512):
        self.generator = generator
        self.system = system
        self.max_gen_len = max_gen_len
        self.turns: List[Message] = []

    def dialog(self) -> List[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def reset(self, system: Optional[str] = None) -> None:
        self.turns = []
        if system is not None:
            self.system = system or None

    def _prompt_len(self) -> int:
        return len(self.generator.formatter.encode_dialog_prompt(self.dialog()))

    def _drop_oldest_turns(self, room: int) -> int:
        """Drop whole exchanges from the start until the prompt leaves `room` tokens; return how many messages went."""
        max_seq_len = self.generator.model.params.max_seq_len
        dropped = 0
        while len(self.turns) > 1 and self._prompt_len() + room > max_seq_len:
            self.turns.pop(0)
            dropped += 1
            while len(self.turns) > 1 and self.turns[0]["role"] != "user":
                self.turns.pop(0)
                dropped += 1
        return dropped

    def ask(self, text: str, temperature: float, top_p: float) -> None:
        """Add the user's message, stream the answer to stdout and keep it in the history."""
        max_seq_len = self.generator.model.params.max_seq_len
        message: Message = {"role": "user", "content": text}
        alone = self.generator.formatter.encode_dialog_prompt(self.dialog()[: 1 if self.system else 0] + [message])
        if len(alone) >= max_seq_len:
            print(f"[that message does not fit the {max_seq_len}-token context: shorten it]", flush=True)
            return
        self.turns.append(message)
        answer = ""
        try:
            dropped = self._drop_oldest_turns(room=min(self.max_gen_len, max_seq_len // 2))
            if dropped:
                print(f"[dropped the {dropped} oldest message(s) to fit the {max_seq_len}-token context]", flush=True)
            room = max_seq_len - self._prompt_len()
            stream = self.generator.stream_chat(
                [self.dialog()], temperature=temperature, top_p=top_p, max_gen_len=min(self.max_gen_len, room)
            )
            for _, piece in stream:
                answer += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print("\n[answer stopped]", end="", flush=True)
        print(flush=True)
        self.turns.append({"role": "assistant", "content": answer})


def _read_line(prompt: str) -> Optional[str]:
    """A line typed on rank 0 (shared with every rank); None at end of input."""
    line: List[Optional[str]] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            line[0] = input(prompt)
        except EOFError:
            line[0] = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(line, src=0)
    return line[0]


def chat(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 2048,
    max_gen_len: int = 512,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    speculate: Optional[str] = None,
    speculate_tokens: int = DRAFT_TOKENS,
) -> None:
    """Chat with a model in the terminal.

    The bundled demo model unless --ckpt_dir; --quantize int8|int4, --compile, --speculate lookup|DRAFT_DIR and
    --speculate_tokens as in Llama.build."""
    if ckpt_dir is None:
        from .demo import demo_checkpoint_dir

        ckpt_dir = str(demo_checkpoint_dir())
    generator = Llama.build(
        ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=1, device=device, dtype=dtype,
        quantize=quantize, compile=compile, speculate=speculate, speculate_tokens=speculate_tokens,
    )
    session = ChatSession(generator, system=system, max_gen_len=max_gen_len)
    # Ctrl-C stops an answer even if this process was started with SIGINT ignored (as background jobs are).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(HELP, flush=True)
    if compile:  # now, rather than in the middle of the first answer
        print("[compiling the decode step: up to a minute the first time, seconds once cached]", flush=True)
        warm_up_decoding(generator.model)
    while True:
        try:
            line = _read_line("\n> ")
            if line is None or line.strip() == "/exit":
                break
            _handle(session, line.strip(), temperature, top_p)
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)", flush=True)


def _handle(session: ChatSession, line: str, temperature: float, top_p: float) -> None:
    """Run one command or send one message."""
    if not line:
        return
    if line == "/reset":
        session.reset()
        print("[conversation cleared]", flush=True)
    elif line == "/system" or line.startswith("/system "):
        session.reset(system=line[len("/system") :].strip())
        print(f"[system prompt {'set' if session.system else 'cleared'}; conversation cleared]", flush=True)
    elif line.startswith("/"):
        print(f"[unknown command {line.split()[0]}] {HELP}", flush=True)
    else:
        session.ask(line, temperature, top_p)
