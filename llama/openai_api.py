"""OpenAI's chat and completions API as request models, and the mapping between its messages, tools and
log-probabilities and ours (llama.chat_format, llama.tool_calls)."""

import json
import uuid
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .chat_format import Message
from .tokenizer import Tokenizer
from .tool_calls import ToolCall


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @property
    def type(self) -> str:
        named = {401: "authentication_error", 404: "not_found_error", 503: "server_overloaded"}
        return named.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Optional[str] = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send several requests for several choices")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, penalty: float) -> float:
        if penalty != 0:
            raise ValueError("penalties are not supported: leave it at 0")
        return penalty

    @property
    def stop_strings(self) -> List[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCallItem(BaseModel):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "ipython"]
    content: Union[str, List[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCallItem]] = None
    tool_call_id: Optional[str] = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str = ""
    parameters: Dict[str, Any] = Field(default_factory=dict)


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Request):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[List[ToolDefinition]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None


class CompletionRequest(_Request):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    suffix: Optional[str] = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: Optional[str]) -> Optional[str]:
        if suffix:
            raise ValueError("suffix (insertion) is not supported")
        return suffix

    def prompts(self) -> List[Union[str, List[int]]]:
        """Each prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


def validation_message(errors: Sequence[dict]) -> Tuple[str, Optional[str]]:
    """A one-line message and the parameter for pydantic's (or the JSON decoder's) first error."""
    error = errors[0]
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {error.get('msg', '')}", None
    param = ".".join(location) or None
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


# ---------------------------------------------------------------------------------------------------------------
# Messages and tools

def tools_for(definitions: Sequence[ToolDefinition]) -> List[Dict[str, Any]]:
    """OpenAI function definitions as custom tools of llama.tool_calls (JSON-schema properties become typed
    parameters, required where the schema lists them)."""
    tools = []
    for definition in definitions:
        schema = definition.function.parameters or {}
        required = set(schema.get("required", []) or [])
        properties = schema.get("properties", {}) or {}
        if not isinstance(properties, dict):
            raise APIError(400, f"tools: {definition.function.name}'s parameters.properties must be an object",
                           param="tools")
        parameters = {}
        for name, spec in properties.items():
            spec = spec if isinstance(spec, dict) else {}
            kind = spec.get("type", "string")
            parameters[name] = {
                "param_type": kind if isinstance(kind, str) else "|".join(map(str, kind)),
                "description": str(spec.get("description", "")),
                "required": name in required,
            }
        tools.append({"tool_name": definition.function.name, "description": definition.function.description,
                      "parameters": parameters})
    return tools


def dialog_for(messages: Sequence[ChatMessage]) -> List[Message]:
    """OpenAI messages as a dialog of llama.chat_format: developer is system, tool results are ipython, and
    assistant tool_calls become tool calls with their ids."""
    dialog: List[Message] = []
    for index, message in enumerate(messages):
        role = {"developer": "system", "tool": "ipython"}.get(message.role, message.role)
        turn: Message = {"role": role, "content": message.text}
        if message.tool_calls:
            if role != "assistant":
                raise APIError(400, f"messages.{index}: only assistant messages carry tool_calls",
                               param=f"messages.{index}.tool_calls")
            turn["tool_calls"] = [_tool_call(call, f"messages.{index}") for call in message.tool_calls]
        dialog.append(turn)
    return dialog


def _tool_call(call: ToolCallItem, where: str) -> ToolCall:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError:
        raise APIError(400, f"{where}: tool call arguments must be a JSON object", param=where) from None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}: tool call arguments must be a JSON object", param=where)
    return {"tool_name": call.function.name, "arguments": arguments, "call_id": call.id or _call_id()}


def forced_call_prefix(tool_choice) -> str:
    """The start of the reply that makes the model call a tool (JSON format): any tool for "required", the named
    one for a named choice; "" otherwise."""
    if tool_choice == "required":
        return '{"type": "function", "name": "'
    if isinstance(tool_choice, NamedToolChoice):
        return json.dumps({"type": "function", "name": tool_choice.function.name})[:-1] + ', "parameters": '
    return ""


def openai_tool_calls(calls: Sequence[ToolCall]) -> List[dict]:
    return [
        {"id": call.get("call_id") or _call_id(), "type": "function",
         "function": {"name": call["tool_name"], "arguments": json.dumps(call["arguments"])}}
        for call in calls
    ]


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities

def chat_logprobs(tokenizer: Tokenizer, tokens: Sequence[int], logprobs: Sequence[float],
                  tops: Sequence[Sequence[Tuple[int, float]]]) -> List[dict]:
    """The chat API's `logprobs.content` for generated `tokens`."""
    def entry(token: int, logprob: float) -> dict:
        raw = tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [
        {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in (tops[i] if i < len(tops) else [])]}
        for i, (token, logprob) in enumerate(zip(tokens, logprobs))
    ]


def completion_logprobs(tokenizer: Tokenizer, tokens: Sequence[int], logprobs: Sequence[Optional[float]],
                        tops: Sequence[Optional[Sequence[Tuple[int, float]]]], offset: int) -> dict:
    """The completions API's `logprobs` for `tokens`, their text starting at character `offset`."""
    strings = [tokenizer.decode_bytes([t]).decode("utf-8", errors="replace") for t in tokens]
    offsets, position = [], offset
    for string in strings:
        offsets.append(position)
        position += len(string)
    return {
        "tokens": strings,
        "token_logprobs": list(logprobs),
        "top_logprobs": [None if top is None else {tokenizer.decode([t]): lp for t, lp in top} for top in tops],
        "text_offset": offsets,
    }
