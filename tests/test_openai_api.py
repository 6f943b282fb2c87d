import pytest

from llama.chat_format import ChatFormat
from llama.openai_api import (
    ChatCompletionRequest,
    dialog_for,
    forced_call_prefix,
    openai_tool_calls,
    tools_for,
)
from llama.tool_calls import parse_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city"}, "unit": {"type": "string", "enum": ["C", "F"]},
    }, "required": ["city"]},
}}


def test_openai_messages_and_tools_become_llama_31_tool_calling(tokenizer):
    body = ChatCompletionRequest(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ], tools=[WEATHER])
    ours = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"tool_name": "get_weather", "arguments": {"city": "Paris"}, "call_id": "call_1"}]},
        {"role": "ipython", "content": '{"temperature": 21}'},
    ]
    tool = {"tool_name": "get_weather", "description": "Current weather in a city", "parameters": {
        "city": {"param_type": "string", "description": "The city", "required": True},
        "unit": {"param_type": "string", "description": "", "required": False},
    }}
    assert tools_for(body.tools) == [tool]
    assert dialog_for(body.messages) == ours
    formatter = ChatFormat(tokenizer)
    assert formatter.encode_dialog_prompt(dialog_for(body.messages), tools=tools_for(body.tools)) == \
        formatter.encode_dialog_prompt(ours, tools=[tool])


def test_a_forced_tool_choice_starts_a_call_the_parser_reads():
    named = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = parse_tool_calls(forced_call_prefix(named.tool_choice) + '{"city": "Oslo"}}', python_tag=False)
    assert [(c["tool_name"], c["arguments"]) for c in calls] == [("get_weather", {"city": "Oslo"})]
    calls = parse_tool_calls(forced_call_prefix("required") + 'get_weather", "parameters": {}}', python_tag=False)
    assert [c["tool_name"] for c in calls] == ["get_weather"]
    assert forced_call_prefix("auto") == forced_call_prefix("none") == ""
    reply = openai_tool_calls(calls)
    assert reply[0]["type"] == "function" and reply[0]["function"] == {"name": "get_weather", "arguments": "{}"}
    assert reply[0]["id"] == calls[0]["call_id"]


@pytest.mark.parametrize("message", [
    {"role": "user", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
])
def test_malformed_tool_calls_are_refused(message):
    from llama.openai_api import APIError

    with pytest.raises(APIError) as refused:
        dialog_for(ChatCompletionRequest(messages=[message]).messages)
    assert refused.value.status == 400 and "messages.0" in refused.value.message
