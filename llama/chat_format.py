"""Dialogs to prompt tokens: Llama 3's format (with Llama 3.1 tool calling) and ChatML. Message text is always
plain text: control-token text inside it is encoded as ordinary characters, so content can never open or
close a message.

A message is `{"role": "system" | "user" | "assistant" | "ipython", "content": str}`; `ipython` carries a
tool's result. An assistant message may also carry `"tool_calls"` (see llama.tool_calls.ToolCall) and a
`"stop_reason"` (end_of_turn, the default; end_of_message when it waits for a tool's result; out_of_tokens).
"""

from datetime import date
from typing import Dict, List, Literal, Optional, Sequence, Type, TypedDict

import jinja2.sandbox

from .tokenizer import Tokenizer
from .tool_calls import (
    BUILTIN_TOOLS,
    STOP_REASONS,
    Tool,
    ToolCall,
    check_tool_call,
    check_tool_prompt_format,
    check_tools,
    custom_tools_prompt,
    encode_tool_call,
    parse_tool_calls,
    system_prompt,
)

Role = Literal["system", "user", "assistant", "ipython"]
ROLES = ("system", "user", "assistant", "ipython")
StopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]


class _MessageBase(TypedDict):
    role: Role
    content: str


class Message(_MessageBase, total=False):
    tool_calls: List[ToolCall]  # assistant only
    stop_reason: StopReason  # assistant only


Dialog = Sequence[Message]


def check_dialog(dialog: Dialog) -> None:
    """Raise ValueError with what to fix unless `dialog` is a non-empty list of well-formed messages."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("a dialog must be a non-empty list of {'role': ..., 'content': ...} messages")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content' keys, got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {i} has role {message['role']!r}: use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i} content must be a str, got {type(message['content']).__name__}")
        assistant_only = sorted({"tool_calls", "stop_reason"} & message.keys())
        if assistant_only and message["role"] != "assistant":
            raise ValueError(f"message {i} is a {message['role']} message: only assistant messages take {assistant_only}")
        if message.get("stop_reason", "end_of_turn") not in STOP_REASONS:
            raise ValueError(f"message {i} stop_reason {message['stop_reason']!r}: use one of {', '.join(STOP_REASONS)}")
        calls = message.get("tool_calls", [])
        if not isinstance(calls, list):
            raise ValueError(f"message {i} tool_calls must be a list of tool call dicts")
        for j, call in enumerate(calls):
            check_tool_call(call, f"message {i} tool call {j}")


# The roles that may follow each role (None: the start of the dialog) in a dialog awaiting a reply.
NEXT_ROLES: Dict[Optional[str], Sequence[str]] = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "ipython"),
    "ipython": ("assistant", "ipython"),
}


def check_turn_order(dialog: Dialog) -> None:
    """Raise ValueError unless the dialog awaits the assistant's reply: an optional system message, then user and
    assistant messages in turn (tool results, role ipython, after an assistant message), ending with the user's
    message or a tool result."""
    previous = None
    for i, message in enumerate(dialog):
        if message["role"] not in NEXT_ROLES[previous]:
            after = f"follow a {previous} message" if previous else "start a dialog"
            expected = " or ".join(NEXT_ROLES[previous])
            raise ValueError(f"message {i} ({message['role']}) cannot {after}: expected {expected}")
        previous = message["role"]
    if previous not in ("user", "ipython"):
        raise ValueError("the last message must be the user's (or a tool result): the assistant's reply comes next")


class ChatFormat:
    """Llama 3: `<|begin_of_text|>`, then `<|start_header_id|>role<|end_header_id|>\\n\\n` + content +
    `<|eot_id|>` per message, then an open assistant header. With tools, Llama 3.1's tool calling."""

    supports_tools = True

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def _text(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def encode_header(self, message: Message) -> List[int]:
        """`<|start_header_id|>role<|end_header_id|>\\n\\n`."""
        special = self.tokenizer.special_tokens
        return [special["<|start_header_id|>"], *self._text(message["role"]), special["<|end_header_id|>"], *self._text("\n\n")]

    def _wrap(self, role: str, body: List[int], end: str = "<|eot_id|>") -> List[int]:
        return [*self.encode_header({"role": role, "content": ""}), *body, self.tokenizer.special_tokens[end]]

    def encode_message(self, message: Message, tool_prompt_format: str = "json") -> List[int]:
        """Header, content (stripped, but an ipython result as is), then for an assistant message its tool
        calls, `<|python_tag|>` first when the first call is to a built-in tool or the code interpreter;
        ends with `<|eom_id|>` for stop_reason end_of_message, else `<|eot_id|>`."""
        calls = message.get("tool_calls", [])
        body = [self.tokenizer.special_tokens["<|python_tag|>"]] if calls and calls[0]["tool_name"] in BUILTIN_TOOLS else []
        body += self._text(message["content"] if message["role"] == "ipython" else message["content"].strip())
        for call in calls:  # each piece is tokenized on its own, as Meta's format does
            body += self._text(encode_tool_call(call, tool_prompt_format))
        end = "<|eom_id|>" if message.get("stop_reason") == "end_of_message" else "<|eot_id|>"
        return self._wrap(message["role"], body, end)

    def encode_tools(
        self, tools: Sequence[Tool], instruction: Optional[str], tool_prompt_format: str, today: Optional[date]
    ) -> List[int]:
        """Llama 3.1's system message for `tools` and `instruction`, then a user message defining any
        custom tools."""
        tokens = self._wrap("system", self._text(system_prompt(tools, instruction, today or date.today())))
        custom = custom_tools_prompt(tools, tool_prompt_format)
        return tokens if custom is None else tokens + self._wrap("user", self._text(custom))

    def encode_dialog_prompt(
        self,
        dialog: Dialog,
        *,
        tools: Optional[Sequence[Tool]] = None,
        tool_prompt_format: str = "json",
        today: Optional[date] = None,
    ) -> List[int]:
        """BOS (if the model has one), every message, then an open assistant header for the reply.

        With `tools` (built-in names and custom tool dicts, see llama.tool_calls; `[]` for none), the
        dialog's system message (or the spec's default) becomes the instruction in Llama 3.1's system
        message, which names the tools, the knowledge cutoff and `today` (default: the current date);
        custom tools are defined in a user message after it, in `tool_prompt_format` ("json" or
        "function_tag"), the format assistant tool calls are written in too.
        """
        check_tool_prompt_format(tool_prompt_format)
        messages, system = list(dialog), self.tokenizer.spec.default_system_prompt
        has_system = bool(messages) and messages[0]["role"] == "system"
        tokens = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        if tools is not None:
            if not self.supports_tools:
                raise ValueError(f"{type(self).__name__} has no tool calling: use a Llama 3 tokenizer, or pass no tools")
            check_tools(tools)
            instruction = messages.pop(0)["content"].strip() if has_system else system
            tokens += self.encode_tools(tools, instruction, tool_prompt_format, today)
        elif system is not None and not has_system:
            messages.insert(0, {"role": "system", "content": system})
        for message in messages:
            tokens += self.encode_message(message, tool_prompt_format)
        return tokens + self.encode_header({"role": "assistant", "content": ""})

    def decode_assistant_message(self, tokens: Sequence[int]) -> Message:
        """The assistant message of generated `tokens`, ending with the stop token if one ended them:
        `{"role": "assistant", "content", "stop_reason", "tool_calls"}`. A reply that is a tool call (see
        llama.tool_calls.parse_tool_calls) has empty content; stop_reason comes from the stop token
        (`<|eom_id|>`: end_of_message; none: out_of_tokens)."""
        special = self.tokenizer.special_tokens
        tokens = list(tokens)
        stop_reason = "out_of_tokens"
        if tokens and tokens[-1] in self.tokenizer.stop_tokens:
            stop_reason = "end_of_message" if tokens.pop() == special.get("<|eom_id|>") else "end_of_turn"
        python_tag = bool(tokens) and tokens[0] == special.get("<|python_tag|>")
        content = self.tokenizer.decode(tokens[1:] if python_tag else tokens)
        calls = parse_tool_calls(content, python_tag) if self.supports_tools else []
        return {"role": "assistant", "content": "" if calls else content, "stop_reason": stop_reason, "tool_calls": calls}


class ChatMLFormat(ChatFormat):
    """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then an open `<|im_start|>assistant\\n`;
    no tool calling."""

    supports_tools = False

    def encode_header(self, message: Message) -> List[int]:
        """`<|im_start|>role\\n`."""
        return [self.tokenizer.special_tokens["<|im_start|>"], *self._text(message["role"] + "\n")]

    def encode_message(self, message: Message, tool_prompt_format: str = "json") -> List[int]:
        """Header, content, `<|im_end|>` and a newline."""
        if message.get("tool_calls"):
            raise ValueError("ChatML messages cannot carry tool_calls: use a Llama 3 tokenizer for tool calling")
        end = self.tokenizer.special_tokens["<|im_end|>"]
        return [*self.encode_header(message), *self._text(message["content"]), end, *self._text("\n")]


CHAT_FORMATS: Dict[str, Type[ChatFormat]] = {"llama3": ChatFormat, "chatml": ChatMLFormat}


def chat_format_for(tokenizer: Tokenizer) -> ChatFormat:
    """The chat format the tokenizer's spec names."""
    name = tokenizer.spec.chat_format
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {name!r} in the tokenizer spec: use one of {', '.join(CHAT_FORMATS)}")
    return CHAT_FORMATS[name](tokenizer)


def default_system_prompt(template: str, tokenizer: Tokenizer) -> Optional[str]:
    """The system message a Jinja chat template inserts when a dialog has none, or None.

    Found by rendering a one-message dialog, reading the system text off where the tokenizer's chat format
    puts it, and keeping it only if rendering the dialog with that system message gives the same text.
    """
    user = {"role": "user", "content": "Hello there."}
    marker = "SYSTEM-MESSAGE-MARKER"
    formatter = chat_format_for(tokenizer)
    special = {v: k for k, v in tokenizer.special_tokens.items()}
    try:
        compiled = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)

        def render(dialog: List[dict]) -> str:
            return compiled.render(
                messages=dialog,
                add_generation_prompt=True,
                bos_token=special.get(tokenizer.bos_id, ""),
                eos_token=special[tokenizer.eos_id],
                raise_exception=_raise_template_error,
            )

        rendered = render([user])
        with_marker = tokenizer.decode(formatter.encode_dialog_prompt([{"role": "system", "content": marker}, user]))
        prefix, _, suffix = with_marker.partition(marker)
        if not (rendered.startswith(prefix) and rendered.endswith(suffix) and len(rendered) > len(prefix) + len(suffix)):
            return None
        system = rendered[len(prefix) : len(rendered) - len(suffix)]
        return system if render([{"role": "system", "content": system}, user]) == rendered else None
    except (jinja2.TemplateError, KeyError, TypeError, ValueError):
        return None


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)
