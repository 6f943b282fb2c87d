"""The interactive chat, driven through a real terminal as a user would."""

import os
import sys
from pathlib import Path

import pexpect
import pytest
from demo_fixtures import demo_cache, demo_ckpt  # noqa: F401

ROOT = Path(__file__).parent.parent


def start_chat(ckpt_dir, *flags, env=None) -> pexpect.spawn:
    """`python -m llama chat` in a terminal, greedy, on `ckpt_dir` (None: the demo model), at its prompt."""
    checkpoint = [] if ckpt_dir is None else ["--ckpt_dir", str(ckpt_dir)]
    command = [sys.executable, "-m", "llama", "chat", *checkpoint, "--temperature", "0", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TIKTOKEN_CACHE_DIR": "", **(env or {})}
    child = pexpect.spawn(command[0], command[1:], cwd=str(ROOT), env=env, encoding="utf-8", timeout=120)
    child.expect("Commands: /reset")
    child.expect("\n> ")
    return child


@pytest.fixture
def tiny_chat(tiny_ckpt):
    # An answer long enough (16,000 tokens, more than a terminal buffers) that Ctrl-C always lands mid-answer.
    child = start_chat(tiny_ckpt, "--max_seq_len", "16384", "--max_gen_len", "16000")
    yield child
    child.close(force=True)


def test_ctrl_c_stops_the_answer_and_keeps_the_session(tiny_chat):
    tiny_chat.sendline("Tell me a very long story")
    tiny_chat.expect("story\r\n")  # the terminal's echo of the question
    tiny_chat.expect(r"\S{3}")  # the answer has started streaming
    tiny_chat.sendintr()
    tiny_chat.expect(r"\[answer stopped\]")
    tiny_chat.expect("\n> ")
    tiny_chat.sendline("/system Be brief")
    tiny_chat.expect(r"\[system prompt set; conversation cleared\]")
    tiny_chat.sendline("/reset")
    tiny_chat.expect(r"\[conversation cleared\]")
    tiny_chat.sendline("/nonsense")
    tiny_chat.expect(r"\[unknown command /nonsense\]")
    tiny_chat.sendline("/exit")
    tiny_chat.expect(pexpect.EOF)
    tiny_chat.wait()
    assert tiny_chat.exitstatus == 0


def test_compiled_chat_compiles_before_the_first_answer(tiny_ckpt):
    child = start_chat(tiny_ckpt, "--compile", "--max_seq_len", "64", "--max_gen_len", "8")
    assert "[compiling the decode step" in child.before
    child.sendline("Hello there")
    child.expect("there\r\n")
    child.expect("\n> ", timeout=10)  # no compiling mid-answer
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_long_history_drops_oldest_turns(tiny_ckpt):
    child = start_chat(tiny_ckpt, "--max_seq_len", "96", "--max_gen_len", "12")
    seen = ""
    for i in range(4):
        child.sendline(f"question number {i} about something")
        child.expect("\n> ")
        seen += child.before
    assert "oldest message(s) to fit the 96-token context]" in seen
    child.sendline("word " * 200)
    child.expect(r"does not fit the 96-token context")
    child.expect("\n> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_demo_chat_answers_about_paris_speculating(demo_ckpt, demo_cache):
    env = {"LLAMA_CACHE": str(demo_cache), "OMP_NUM_THREADS": "1"}
    child = start_chat(None, "--max_gen_len", "40", "--speculate", "lookup", env=env)
    child.sendline("What is the capital of France?")
    child.expect("\n> ")
    assert "Paris" in child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
