"""Dialogs to prompt tokens: Llama 3's format and ChatML. Message text is always plain text: control-token
text inside it is encoded as ordinary characters, so content can never open or close a message."""

from typing import Dict, List, Literal, Sequence, Type, TypedDict

from .tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "ipython"]
ROLES = ("system", "user", "assistant", "ipython")


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Message]


def check_dialog(dialog: Dialog) -> None:
    """Raise ValueError with what to fix unless `dialog` is a non-empty list of {role, content: str} messages."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("a dialog must be a non-empty list of {'role': ..., 'content': ...} messages")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content' keys, got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {i} has role {message['role']!r}: use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i} content must be a str, got {type(message['content']).__name__}")


class ChatFormat:
    """Llama 3: `<|begin_of_text|>`, then `<|start_header_id|>role<|end_header_id|>\\n\\n` + content +
    `<|eot_id|>` per message, then an open assistant header."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def _text(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def _with_default_system(self, dialog: Dialog) -> List[Message]:
        system = self.tokenizer.spec.default_system_prompt
        if system is not None and dialog[0]["role"] != "system":
            return [{"role": "system", "content": system}, *dialog]
        return list(dialog)

    def encode_header(self, message: Message) -> List[int]:
        """`<|start_header_id|>role<|end_header_id|>\\n\\n`."""
        special = self.tokenizer.special_tokens
        return [special["<|start_header_id|>"], *self._text(message["role"]), special["<|end_header_id|>"], *self._text("\n\n")]

    def encode_message(self, message: Message) -> List[int]:
        """Header, stripped content and `<|eot_id|>`."""
        return [*self.encode_header(message), *self._text(message["content"].strip()), self.tokenizer.special_tokens["<|eot_id|>"]]

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """`<|begin_of_text|>`, every message, then an open assistant header for the reply."""
        tokens = [self.tokenizer.bos_id]
        for message in self._with_default_system(dialog):
            tokens.extend(self.encode_message(message))
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens


class ChatMLFormat(ChatFormat):
    """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then an open `<|im_start|>assistant\\n`;
    no BOS."""

    def encode_header(self, message: Message) -> List[int]:
        """`<|im_start|>role\\n`."""
        return [self.tokenizer.special_tokens["<|im_start|>"], *self._text(message["role"] + "\n")]

    def encode_message(self, message: Message) -> List[int]:
        """Header, content, `<|im_end|>` and a newline."""
        end = self.tokenizer.special_tokens["<|im_end|>"]
        return [*self.encode_header(message), *self._text(message["content"]), end, *self._text("\n")]

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """Every message, then an open assistant header."""
        tokens = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        for message in self._with_default_system(dialog):
            tokens.extend(self.encode_message(message))
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens


CHAT_FORMATS: Dict[str, Type[ChatFormat]] = {"llama3": ChatFormat, "chatml": ChatMLFormat}


def chat_format_for(tokenizer: Tokenizer) -> ChatFormat:
    """The chat format the tokenizer's spec names."""
    name = tokenizer.spec.chat_format
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {name!r} in the tokenizer spec: use one of {', '.join(CHAT_FORMATS)}")
    return CHAT_FORMATS[name](tokenizer)
