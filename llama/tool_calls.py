"""Llama 3.1 tool calling as Meta's format writes it: the prompt text that offers tools, the text of a
tool call in an assistant message, and parsing a model's reply back into tool calls.

A tool is a built-in tool's name (`BUILTIN_TOOLS`) or a custom tool dict
`{"tool_name": str, "description": str, "parameters": {name: {"param_type": str, "description": str,
"required": bool}}}` (description and required are optional; required defaults to True). A tool call is
`{"tool_name": str, "arguments": dict, "call_id": str}`: built-in search tools take `{"query": str}`,
`code_interpreter` takes `{"code": str}`; call_id is optional.
"""

import ast
import json
import re
import uuid
from datetime import date
from string import Template
from typing import Any, Dict, List, Optional, Sequence, TypedDict, Union

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
TOOL_PROMPT_FORMATS = ("json", "function_tag")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")

Tool = Union[str, Dict[str, Any]]


class _ToolCallBase(TypedDict):
    tool_name: str
    arguments: Dict[str, Any]


class ToolCall(_ToolCallBase, total=False):
    call_id: str


_JSON_TOOL = Template(
    """{
    "type": "function",
    "function": {
        "name": "$name",
        "description": "$description",
        "parameters": {
            "type": "object",
            "properties": [$properties
            ],
            "required": $required
        }
    }
}
"""
)
_JSON_PROPERTY = Template(
    """
                {
                    "$name": {
                        "type": "object",
                        "description": "$description"
                    }
                }"""
)
_JSON_HEAD = (
    "Answer the user's question by making use of the following functions if needed.\n"
    "If none of the function can be used, please say so.\n"
    "Here is a list of functions in JSON format:\n"
)
_JSON_TAIL = "\nReturn function calls in JSON format."
_FUNCTION_TAG_HEAD = "You have access to the following functions:\n\n"
_FUNCTION_TAG_TAIL = """Think very carefully before calling functions.
If you choose to call a function ONLY reply in the following format with no prefix or suffix:

<function=example_function_name>{"example_name": "example_value"}</function>

Reminder:
- If looking for real time information use relevant functions before falling back to brave_search
- Function calls MUST follow the specified format, start with <function= and end with </function>
- Required parameters MUST be specified
- Only call one function at a time
- Put the entire function call reply on one line"""

_FUNCTION_TAG = re.compile(r"<function=([^>]+)>")
_BUILTIN_CALL = re.compile(r'\b(\w+)\.call\(query="([^"]*)"\)')
_HTML_UNSAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "'": "\\u0027"})


def check_tools(tools: Sequence[Tool]) -> None:
    """Raise ValueError with what to fix unless `tools` is a list of built-in names and custom tool dicts."""
    if not isinstance(tools, (list, tuple)):
        raise ValueError("tools must be a list of built-in tool names and custom tool dicts")
    for i, tool in enumerate(tools):
        if isinstance(tool, str):
            if tool not in BUILTIN_TOOLS:
                raise ValueError(f"tool {i} {tool!r} is not built in: use one of {', '.join(BUILTIN_TOOLS)} or a dict")
            continue
        if not isinstance(tool, dict) or not isinstance(tool.get("tool_name"), str) or not tool["tool_name"]:
            raise ValueError(f"tool {i} must be a built-in tool name or a dict with a 'tool_name' str, got {tool!r}")
        if not isinstance(tool.get("description", ""), str):
            raise ValueError(f"tool {i} description must be a str")
        parameters = tool.get("parameters", {})
        if not isinstance(parameters, dict) or not all(
            isinstance(p, dict) and isinstance(p.get("param_type"), str) and isinstance(p.get("description", ""), str)
            and isinstance(p.get("required", True), bool)
            for p in parameters.values()
        ):
            raise ValueError(
                f"tool {i} parameters must map names to {{'param_type': str, 'description': str, 'required': bool}}"
            )


def check_tool_call(call: Any, where: str) -> None:
    """Raise ValueError naming `where` unless `call` is a well-formed tool call dict."""
    if not isinstance(call, dict) or not isinstance(call.get("tool_name"), str) or not call["tool_name"]:
        raise ValueError(f"{where} must be a dict with a 'tool_name' str and an 'arguments' dict, got {call!r}")
    arguments = call.get("arguments")
    if not isinstance(arguments, dict):
        raise ValueError(f"{where} arguments must be a dict, got {arguments!r}")
    if not isinstance(call.get("call_id", ""), str):
        raise ValueError(f"{where} call_id must be a str")
    key = "code" if call["tool_name"] == "code_interpreter" else "query"
    if call["tool_name"] in BUILTIN_TOOLS and not isinstance(arguments.get(key), str):
        raise ValueError(f"{where}: {call['tool_name']} takes arguments {{{key!r}: str}}")
    try:
        json.dumps(arguments)
    except (TypeError, ValueError):
        raise ValueError(f"{where} arguments must be JSON-serialisable") from None


def check_tool_prompt_format(tool_prompt_format: str) -> None:
    """Raise ValueError unless `tool_prompt_format` is one of TOOL_PROMPT_FORMATS."""
    if tool_prompt_format not in TOOL_PROMPT_FORMATS:
        raise ValueError(f"unknown tool_prompt_format {tool_prompt_format!r}: use one of {', '.join(TOOL_PROMPT_FORMATS)}")


def system_prompt(tools: Sequence[Tool], instruction: Optional[str], today: date) -> str:
    """The system message: `Environment: ipython` and a `Tools:` line for any tools, the knowledge cutoff and
    today's date, then the instruction."""
    text = ""
    if tools:
        named = [t for t in tools if isinstance(t, str) and t != "code_interpreter"]
        text = "Environment: ipython\n" + (f"Tools: {', '.join(named)}" if named else "") + "\n"
    text += f"Cutting Knowledge Date: December 2023\nToday Date: {today:%d %B %Y}"
    if instruction:
        text += "\n\n" + instruction
    return text + "\n"


def custom_tools_prompt(tools: Sequence[Tool], tool_prompt_format: str) -> Optional[str]:
    """The user message that defines the custom tools (None without any). Names and descriptions go in as
    written, as Meta's templates put them."""
    custom = [t for t in tools if isinstance(t, dict)]
    if not custom:
        return None
    if tool_prompt_format == "function_tag":
        return _FUNCTION_TAG_HEAD + "".join(map(_function_tag_definition, custom)) + _FUNCTION_TAG_TAIL
    return _JSON_HEAD + "".join(map(_json_definition, custom)) + _JSON_TAIL


def _json_definition(tool: Dict[str, Any]) -> str:
    parameters = tool.get("parameters", {})
    properties = ",".join(
        _JSON_PROPERTY.substitute(name=name, description=p.get("description", "")) for name, p in parameters.items()
    )
    required = [name for name, p in parameters.items() if p.get("required", True)]
    return _JSON_TOOL.substitute(
        name=tool["tool_name"], description=tool.get("description", ""), properties=properties, required=_tojson(required)
    )


def _function_tag_definition(tool: Dict[str, Any]) -> str:
    name, description = tool["tool_name"], tool.get("description", "")
    parameters = {
        key: {"description": p.get("description", ""), "param_type": p["param_type"], "required": p.get("required", True)}
        for key, p in tool.get("parameters", {}).items()
    }
    definition = f'{{"name": "{name}", "description": "{description}", "parameters": {_tojson(parameters)}}}'
    return f"Use the function '{name}' to '{description}':\n{definition}\n\n"


def _tojson(value: Any) -> str:
    """JSON as Jinja's `tojson` filter writes it: sorted keys, HTML-significant characters escaped."""
    return json.dumps(value, sort_keys=True).translate(_HTML_UNSAFE)


def encode_tool_call(call: ToolCall, tool_prompt_format: str) -> str:
    """The text of a call: code as is, `name.call(query="...")` for built-in tools, and for custom tools
    `{"type": "function", "name": ..., "parameters": ...}` or `<function=name>{...}</function>`."""
    name, arguments = call["tool_name"], call["arguments"]
    if name == "code_interpreter":
        return arguments["code"]
    if name in BUILTIN_TOOLS:
        return f'{name}.call(query="{arguments["query"]}")'
    if tool_prompt_format == "function_tag":
        return f"<function={name}>{json.dumps(arguments)}</function>"
    return json.dumps({"type": "function", "name": name, "parameters": arguments})


def parse_tool_calls(text: str, python_tag: bool) -> List[ToolCall]:
    """Tool calls in a reply, tried in Meta's order: `<function=name>{...}`, a whole-reply JSON object with
    a "name", a Python list of keyword calls `[f(a=1), g(b="x")]`, `tool.call(query="...")`, and else, after
    `<|python_tag|>` (`python_tag`), the reply as code for the code interpreter. [] for plain text."""
    text = text.strip(" ")
    found = _function_tag_call(text) or _json_call(text) or _python_list_calls(text) or _builtin_call(text)
    if not found and python_tag:
        found = [("code_interpreter", {"code": text})]
    return [{"tool_name": name, "arguments": arguments, "call_id": str(uuid.uuid4())} for name, arguments in found]


def _function_tag_call(text: str) -> list:
    match = _FUNCTION_TAG.search(text)
    if match is None:
        return []
    try:
        arguments, _ = json.JSONDecoder().raw_decode(text, match.end())
    except json.JSONDecodeError:
        return []
    return [(match.group(1), arguments)] if isinstance(arguments, dict) else []


def _json_call(text: str) -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return []
    arguments = value.get("parameters", {})
    return [(value["name"], arguments)] if isinstance(arguments, dict) else []


def _python_list_calls(text: str) -> list:
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return []
    if not isinstance(tree, ast.List) or not tree.elts:
        return []
    calls = []
    for call in tree.elts:
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
            return []
        if any(k.arg is None for k in call.keywords):
            return []
        try:
            calls.append((call.func.id, {k.arg: ast.literal_eval(k.value) for k in call.keywords}))
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return []
    return calls


def _builtin_call(text: str) -> list:
    match = _BUILTIN_CALL.search(text)
    return [] if match is None else [(match.group(1), {"query": match.group(2)})]
