"""The server driven by the official openai client (and raw HTTP for what a client library would refuse to send)."""

import concurrent.futures
import json
import time

import httpx
import openai
import pytest
from demo_fixtures import demo_cache, demo_ckpt  # noqa: F401
from servers import InProcessServer

from llama import Llama

QUESTIONS = [f"In one sentence, what is {thing}?" for thing in (
    "a river", "a violin", "gravity", "a volcano", "bread", "a comet", "a library", "rain", "a bridge", "chess",
    "a glacier", "the moon", "a compass", "honey", "a lighthouse", "snow",
)]


@pytest.fixture(scope="module")
def demo(demo_ckpt) -> Llama:  # noqa: F811
    return Llama.build(demo_ckpt, max_seq_len=512, max_batch_size=16, dtype="float32")


@pytest.fixture(scope="module")
def server(demo):
    running = InProcessServer(demo)
    yield running
    running.close()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, question: str, **options):
    options = {"model": "test-model", "temperature": 0, **options}
    return client.chat.completions.create(messages=[{"role": "user", "content": question}], **options)


def streamed(client, question: str, max_tokens: int = 8) -> str:
    stream = ask(client, question, max_tokens=max_tokens, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_chat_completion_counts_its_tokens(client, demo):
    reply = ask(client, QUESTIONS[0], max_tokens=12)
    prompt = demo.formatter.encode_dialog_prompt([{"role": "user", "content": QUESTIONS[0]}])
    assert reply.object == "chat.completion" and reply.model == "test-model"
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == len(prompt) + 12
    expected = demo.chat_completion([[{"role": "user", "content": QUESTIONS[0]}]], temperature=0, max_gen_len=12)
    assert reply.choices[0].message.content == expected[0]["generation"]["content"]


def test_stream_adds_up_to_the_reply_and_ends_with_usage(client):
    whole = ask(client, QUESTIONS[1], max_tokens=12)
    chunks = list(ask(client, QUESTIONS[1], max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_seed_and_logprobs(client):
    whole = ask(client, QUESTIONS[2], max_tokens=20).choices[0].message.content
    stop = whole[8:12]
    cut = ask(client, QUESTIONS[2], max_tokens=20, stop=[stop])
    assert cut.choices[0].message.content == whole[: whole.find(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [ask(client, QUESTIONS[3], max_tokens=10, seed=7, temperature=1.0).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    reply = ask(client, QUESTIONS[3], max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:  # greedy: the chosen token is the most likely one
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob) and token.logprob <= 0


def test_completions_take_text_lists_and_token_ids(client, demo):
    one = client.completions.create(model="test-model", prompt="The capital of France is", max_tokens=5,
                                    temperature=0)
    tokens = demo.tokenizer.encode("The capital of France is", bos=True, eos=False)
    by_ids = client.completions.create(model="test-model", prompt=tokens, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text and one.usage.prompt_tokens == len(tokens)
    two = client.completions.create(model="test-model", prompt=["Once upon a time", "The capital of France is"],
                                    max_tokens=5, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[1].text == one.choices[0].text
    echoed = client.completions.create(model="test-model", prompt="The capital of France is", max_tokens=5,
                                       temperature=0, echo=True, logprobs=2)
    logprobs = echoed.choices[0].logprobs
    assert echoed.choices[0].text == "The capital of France is" + one.choices[0].text
    assert len(logprobs.tokens) == len(tokens) + 5 and logprobs.token_logprobs[0] is None
    assert "".join(logprobs.tokens) == echoed.choices[0].text
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:]) and len(logprobs.top_logprobs[-1]) == 2
    stream = client.completions.create(model="test-model", prompt="The capital of France is", max_tokens=5,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == one.choices[0].text


def test_sixteen_concurrent_streams_get_what_each_gets_alone(client):
    alone = [streamed(client, q) for q in QUESTIONS]
    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: streamed(client, q), QUESTIONS))
    assert together == alone
    assert len(set(alone)) == len(alone)


def test_models_health_metrics_and_unknown_model(client, server):
    assert [m.id for m in client.models.list().data] == ["test-model"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("llama_requests_total", "llama_generated_tokens_total", "llama_queue_length",
                 "llama_time_to_first_token_seconds_count"):
        assert name in metrics
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(client, "hi", max_tokens=2, model="gpt-4")


def test_a_client_leaving_mid_stream_frees_its_slot(client, server):
    stream = ask(client, QUESTIONS[4], max_tokens=400, stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    wait_until_idle(server.generator.engine)
    assert ask(client, QUESTIONS[5], max_tokens=3).choices[0].finish_reason == "length"


def wait_until_idle(engine, timeout: float = 10) -> None:
    """Until no request holds a slot or waits for one (cancellations take effect at the engine's next step)."""
    deadline = time.time() + timeout
    while (engine.running_count or engine.queue_length) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.running_count == 0 and engine.queue_length == 0


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b"[]"),
    ("/v1/chat/completions", json.dumps({"messages": []})),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "hi"}]})),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 9})),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1})),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 3})),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50})),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                         "tools": [{"type": "function", "function": {"name": "f"}}]})),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "word " * 600}]})),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]})),
    ("/v1/completions", json.dumps({"prompt": [10**9], "max_tokens": 2})),
    ("/v1/completions", json.dumps({"prompt": {"a": 1}})),
    ("/v1/completions", json.dumps({"prompt": "hi", "logprobs": 99})),
    ("/v1/completions", json.dumps({"prompt": "hi", "suffix": "x"})),
    ("/v1/completions", json.dumps({"max_tokens": 2})),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(500):
            path, body = BAD_REQUESTS[i % len(BAD_REQUESTS)]
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"] == "invalid_request_error" and set(error) == {
                "message", "type", "param", "code"}
        too_long = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 600}]})
        assert "maximum context length is 512 tokens, your messages resulted in" in too_long.json()["error"]["message"]
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        huge = http.post("/v1/chat/completions", content=b" " * (5 << 20), headers={"Content-Type": "application/json"})
        assert huge.status_code == 413 and "over" in huge.json()["error"]["message"]
        assert http.get("/no/such/path").status_code == 404
    assert ask(client, QUESTIONS[6], max_tokens=3).usage.completion_tokens == 3
    assert server.generator.engine.running_count == 0


def test_a_full_queue_answers_503_and_the_server_recovers(tiny_ckpt):
    generator = Llama.build(tiny_ckpt, max_seq_len=512, max_batch_size=1, dtype="float32")
    generator.engine.max_queue = 1
    running = InProcessServer(generator)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        holding = ask(client, "hold the slot", max_tokens=400, stream=True)
        next(iter(holding))
        waiting = ask(client, "wait", max_tokens=400, stream=True)  # queued (its first chunk comes at once)
        with pytest.raises(openai.APIStatusError) as refused:
            ask(client, "one too many", max_tokens=2)
        assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "1"
        assert "busy" in refused.value.message
        holding.close()
        waiting.close()
        wait_until_idle(running.generator.engine)
        assert ask(client, "again", max_tokens=2).usage.completion_tokens == 2
    finally:
        running.close()


def test_an_api_key_is_required_when_set(tiny_ckpt):
    generator = Llama.build(tiny_ckpt, max_seq_len=64, max_batch_size=1, dtype="float32")
    running = InProcessServer(generator, api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            ask(openai.OpenAI(base_url=running.url + "/v1", api_key="wrong", max_retries=0), "hi", max_tokens=1)
        right = openai.OpenAI(base_url=running.url + "/v1", api_key="sesame", max_retries=0)
        assert ask(right, "hi", max_tokens=1).usage.completion_tokens == 1
        assert httpx.get(running.url + "/health").status_code == 200
    finally:
        running.close()


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}


def script_replies(generator, monkeypatch, text: str) -> None:
    """Make every request's reply `text` then <|eot_id|>, whatever the (random) model would say: the server's
    tool-call handling on a reply a real model gives."""
    import torch

    script = generator.tokenizer.encode(text, bos=False, eos=False) + [generator.tokenizer.special_tokens["<|eot_id|>"]]
    run_step = generator.engine.run_step

    def scripted_step(plan):
        forced = torch.full_like(run_step(plan), -1e9)  # one request at a time: its rows in order
        for row in range(len(plan.logit_rows)):
            sampled = scripted_step.sampled
            forced[row, script[min(sampled, len(script) - 1)]] = 0
            scripted_step.sampled += 1
        return forced

    scripted_step.sampled = 0
    monkeypatch.setattr(generator.engine, "run_step", scripted_step)


def test_tool_calls_come_back_as_openai_tool_calls(tiny_ckpt, monkeypatch):
    generator = Llama.build(tiny_ckpt, max_seq_len=1024, max_batch_size=1, dtype="float32")
    running = InProcessServer(generator)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        question = [{"role": "user", "content": "Weather in Paris?"}]
        call_text = '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}'
        script_replies(generator, monkeypatch, call_text)
        reply = client.chat.completions.create(model="test-model", messages=question, tools=[WEATHER_TOOL])
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

        script_replies(generator, monkeypatch, '{"city": "Rome"}}')  # after the forced call's opening
        chunks = list(client.chat.completions.create(
            model="test-model", messages=question, tools=[WEATHER_TOOL], stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}))
        (delta,) = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert delta[0].function.name == "get_weather" and json.loads(delta[0].function.arguments) == {"city": "Rome"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        script_replies(generator, monkeypatch, "It is 21 degrees in Paris.")
        history = question + [choice.message.model_dump(exclude_none=True),
                              {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
        answer = client.chat.completions.create(model="test-model", messages=history, tools=[WEATHER_TOOL])
        assert answer.choices[0].message.content == "It is 21 degrees in Paris."
        assert answer.choices[0].finish_reason == "stop" and answer.usage.prompt_tokens > reply.usage.prompt_tokens
    finally:
        running.close()
