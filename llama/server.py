"""An OpenAI-compatible HTTP server over the engine (llama.engine): chat and text completions, streamed as
Server-Sent Events, model list, health, Prometheus metrics and a chat page.

Requests run on one engine thread that owns the model; each HTTP request waits on its own queue of texts. Under
torchrun, rank 0 serves and schedules and sends every step to the other ranks, which run it (see `follow`).
"""

import asyncio
import json
import os
import sys
import threading
import time
import traceback
import uuid
from importlib import resources
from typing import AsyncIterator, List, Optional, Tuple

import torch.distributed as dist
from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from .engine import Engine, QueueFull, Request, StepPlan
from .generation import Llama
from .openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    dialog_for,
    forced_call_prefix,
    openai_tool_calls,
    tools_for,
    validation_message,
)
from .sampling import SamplingParams

disable_created_metrics()  # no *_created series beside the counters

MAX_BODY_BYTES = 4 << 20
HEARTBEAT_SECONDS = 5.0  # how often an idle rank 0 shows the other ranks it is alive
STOP = "stop"  # the plan that ends the other ranks' loops


# ---------------------------------------------------------------------------------------------------------------
# The engine's thread, and the other ranks

class EngineThread(threading.Thread):
    """Runs the engine's steps while there is work. A failed step ends its requests with the error and the
    server goes on; under torchrun a failure (a rank gone) ends the process with exit status 1 instead of
    leaving the others waiting."""

    def __init__(self, engine: Engine, *, distributed: bool):
        super().__init__(name="llama-engine", daemon=True)
        self.engine, self.distributed = engine, distributed
        self._stopping = threading.Event()
        if distributed:
            engine.before_run = _send_plan

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.engine.wait_for_work(HEARTBEAT_SECONDS):
                    if self.distributed:
                        _send_plan(None)
                    continue
                try:
                    self.engine.step()
                except Exception:
                    if self.distributed:
                        raise
                    traceback.print_exc()
            if self.distributed:
                _send_plan(STOP)
        except Exception as error:  # noqa: BLE001 - a rank failed: nothing can be served any more
            print(f"error: the model-parallel group failed ({type(error).__name__}: {error}); exiting", file=sys.stderr,
                  flush=True)
            os._exit(1)

    def stop(self) -> None:
        self._stopping.set()
        self.engine.wake()


def _send_plan(plan) -> None:
    dist.broadcast_object_list([plan], src=0)


def follow(engine: Engine) -> None:
    """On a rank other than 0: run every step rank 0 sends, until it sends STOP. Exits the process with status 1
    if rank 0 (or the group) fails."""
    try:
        while True:
            box: List[Optional[StepPlan]] = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] == STOP:
                return
            if box[0] is not None:
                engine.run_step(box[0])
    except Exception as error:  # noqa: BLE001
        print(f"error: rank {dist.get_rank()} lost the model-parallel group ({type(error).__name__}: {error})",
              file=sys.stderr, flush=True)
        os._exit(1)


# ---------------------------------------------------------------------------------------------------------------
# Requests in flight

class _Pending:
    """One engine request seen from the event loop: its new texts arrive on an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._texts: asyncio.Queue = asyncio.Queue()

    def on_text(self, request: Request, text: str) -> None:  # the engine's thread
        self._loop.call_soon_threadsafe(self._texts.put_nowait, text)

    async def next_text(self) -> str:
        return await self._texts.get()


class _Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("llama_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=self.registry)
        self.generated_tokens = Counter("llama_generated_tokens", "Tokens generated", registry=self.registry)
        queue = Gauge("llama_queue_length", "Requests waiting for a slot", registry=self.registry)
        queue.set_function(lambda: engine.queue_length)
        running = Gauge("llama_running_requests", "Requests holding a slot", registry=self.registry)
        running.set_function(lambda: engine.running_count)
        self.time_to_first_token = Histogram(
            "llama_time_to_first_token_seconds", "From arrival to the first generated token",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry,
        )


class _BodyLimit:
    """ASGI middleware answering 413 to bodies over `limit` bytes, declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error_response(APIError(413, self._message()))(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise APIError(413, self._message())
            return message

        return await self.app(scope, counted_receive, send)

    def _message(self) -> str:
        return f"the request body is over {self.limit} bytes"


class _CountRequests:
    """ASGI middleware counting answered requests by path and status."""

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.counter.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counted_send)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# ---------------------------------------------------------------------------------------------------------------
# The app

def create_app(generator: Llama, *, model_name: str, api_key: Optional[str] = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `generator` through its engine (whose steps an EngineThread must run)."""
    engine, tokenizer, formatter = generator.engine, generator.tokenizer, generator.formatter
    max_seq_len = generator.model.params.max_seq_len
    metrics = _Metrics(engine)
    app = FastAPI(title="llama", docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    app.add_middleware(_CountRequests, counter=metrics.requests)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, error: APIError):
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: HTTPRequest, error: RequestValidationError):
        message, param = validation_message(error.errors())
        return _error_response(APIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, error: HTTPException):
        return _error_response(APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def server_error(request: HTTPRequest, error: Exception):
        traceback.print_exception(error)
        return _error_response(APIError(500, f"internal error: {type(error).__name__}: {error}"))

    def authorize(request: HTTPRequest) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    def check_model(name: Optional[str]) -> None:
        if name not in (None, "", model_name):
            raise APIError(404, f"the model {name!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def check_prompt(tokens: List[int], param: str) -> None:
        if not tokens:
            raise APIError(400, "the prompt is empty", param=param)
        if len(tokens) >= max_seq_len:
            what = "messages" if param == "messages" else "prompt"
            raise APIError(
                400, f"this model's maximum context length is {max_seq_len} tokens, your {what} resulted in "
                     f"{len(tokens)} tokens (leaving no room for a reply): shorten it",
                param=param, code="context_length_exceeded",
            )

    def start(prompt: List[int], max_tokens: Optional[int], sampling: SamplingParams,
              stop: List[str]) -> Tuple[Request, _Pending]:
        pending = _Pending(asyncio.get_running_loop())
        room = max_seq_len - len(prompt)
        request = Request(prompt, tokenizer, min(max_tokens or room, room), sampling, stop, on_text=pending.on_text)
        try:
            engine.submit(request)
        except QueueFull:
            raise APIError(503, "the server is busy: every slot is taken and the queue is full, retry shortly",
                           headers={"Retry-After": "1"}) from None
        return request, pending

    def finish(request: Request) -> None:
        if request.first_token_at is not None:
            metrics.time_to_first_token.observe(request.first_token_at - request.arrived)
        metrics.prompt_tokens.inc(len(request.prompt))
        metrics.generated_tokens.inc(generated_count(request))

    async def wait(request: Request, pending: _Pending, http: HTTPRequest) -> bool:
        """Until `request` finishes; returns False, having cancelled it, if the client leaves first."""
        try:
            while True:
                try:
                    if await asyncio.wait_for(pending.next_text(), timeout=1.0) == "" and request.finished:
                        break
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        request.cancel()
                        return False
        finally:
            finish(request)
        raise_if_failed(request)
        return True

    def sampling_for(body, *, logprobs: bool, top_logprobs: int, prompt_logprobs: bool = False) -> SamplingParams:
        try:
            return SamplingParams(body.temperature, body.top_p, body.seed, logprobs, top_logprobs, prompt_logprobs)
        except ValueError as error:
            raise APIError(400, str(error)) from None

    # -- chat ---------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        check_model(body.model)
        offered = body.tools if body.tools and body.tool_choice != "none" else None
        prefix = forced_call_prefix(body.tool_choice) if offered else ""
        try:
            dialog = dialog_for(body.messages)
            prompt = formatter.encode_dialog_prompt(dialog, tools=tools_for(offered) if offered else None)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        prefix_tokens = tokenizer.encode(prefix, bos=False, eos=False) if prefix else []
        prompt += prefix_tokens
        check_prompt(prompt, "messages")
        sampling = sampling_for(body, logprobs=body.logprobs, top_logprobs=(body.top_logprobs or 0) * body.logprobs)
        request, pending = start(prompt, body.max_completion_tokens or body.max_tokens, sampling, body.stop_strings)
        reply_id, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

        def reply() -> Tuple[dict, str]:
            """The finished message and its finish reason."""
            sequence = request.sequence
            if offered is not None:
                tokens = prefix_tokens + sequence.tokens + [sequence.stop_token] * (sequence.stop_token is not None)
                message = formatter.decode_assistant_message(tokens)
                if message["tool_calls"]:
                    calls = openai_tool_calls(message["tool_calls"])
                    return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
            return {"role": "assistant", "content": sequence.text}, sequence.finish_reason

        def logprobs_between(begin: int, end: int) -> Optional[dict]:
            """logprobs of the generated tokens begin:end, or None unless asked for."""
            if not body.logprobs:
                return None
            sequence = request.sequence
            tokens = sequence.tokens[begin:end]
            return {"content": chat_logprobs(tokenizer, tokens, sequence.token_logprobs[begin:end],
                                             sequence.top_logprobs[begin:end])}

        if not body.stream:
            await wait(request, pending, http)
            message, finish_reason = reply()
            return {
                "id": reply_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": message, "logprobs": logprobs_between(0, None),
                             "finish_reason": finish_reason}],
                "usage": usage(request),
            }

        def chunk(delta: dict, finish_reason: Optional[str] = None, logprobs: Optional[dict] = None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return {"data": json.dumps({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                                        "model": model_name, "choices": [choice]})}

        async def events() -> AsyncIterator[dict]:
            sent = 0  # tokens whose logprobs went out
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    text = await pending.next_text()
                    if text and offered is None:  # with tools, the reply is sent whole, once parsed
                        released = request.sequence.released_tokens
                        yield chunk({"content": text}, logprobs=logprobs_between(sent, released))
                        sent = released
                    if not text and request.finished:
                        break
                raise_if_failed(request)
                message, finish_reason = reply()
                if offered is not None:
                    delta = ({"tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]}
                             if message.get("tool_calls") else {"content": message["content"]})
                    yield chunk(delta, logprobs=logprobs_between(0, None))
                    sent = len(request.sequence.tokens)
                tail = logprobs_between(sent, None)
                yield chunk({}, finish_reason, logprobs=tail if tail and tail["content"] else None)
                if body.include_usage:
                    yield {"data": json.dumps({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                                               "model": model_name, "choices": [], "usage": usage(request)})}
                yield {"data": "[DONE]"}
            finally:
                request.cancel()  # a client gone mid-stream frees its slot at the next step
                finish(request)

        return EventSourceResponse(events(), ping=15)

    # -- completions ----------------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body.model)
        prompts = []
        for index, prompt in enumerate(body.prompts()):
            if isinstance(prompt, str):
                tokens = tokenizer.encode(prompt, bos=True, eos=False)
            else:
                tokens = list(prompt)
                if any(not 0 <= t < tokenizer.n_words for t in tokens):
                    raise APIError(400, f"prompt {index} has token ids outside the vocabulary [0, {tokenizer.n_words})",
                                   param="prompt")
            check_prompt(tokens, "prompt")
            prompts.append(tokens)
        if not prompts:
            raise APIError(400, "give at least one prompt", param="prompt")
        top = body.logprobs or 0
        sampling = sampling_for(body, logprobs=body.logprobs is not None, top_logprobs=top,
                                prompt_logprobs=body.echo and body.logprobs is not None)
        started = []
        try:
            for tokens in prompts:
                started.append(start(tokens, body.max_tokens, sampling, body.stop_strings))
        except APIError:
            for request, _ in started:
                request.cancel()
            raise
        reply_id, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

        def text_logprobs(request: Request) -> Optional[dict]:
            """logprobs of the returned tokens: the prompt's first with echo (the first has none)."""
            if body.logprobs is None:
                return None
            sequence, prompt = request.sequence, request.prompt
            generated = len(sequence.tokens)
            logprobs, tops = sequence.token_logprobs, sequence.top_logprobs[:generated]
            if body.echo:
                tokens = prompt + sequence.tokens
                logprobs = [None] + logprobs[: len(prompt) - 1] + logprobs[len(prompt) - 1 :][:generated]
                tops = [None] * len(prompt) + tops
            else:
                tokens, logprobs = sequence.tokens, logprobs[:generated]
            return completion_logprobs(tokenizer, tokens, logprobs, tops, 0)

        def prompt_text(request: Request) -> str:
            return tokenizer.decode(request.prompt) if body.echo else ""

        def choice(index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict]) -> dict:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

        if not body.stream:
            for request, pending in started:
                if not await wait(request, pending, http):  # the client left: nothing more to compute
                    for other, _ in started:
                        other.cancel()
                    break
            choices = [
                choice(i, prompt_text(r) + r.sequence.text, r.sequence.finish_reason, text_logprobs(r))
                for i, (r, _) in enumerate(started)
            ]
            return {"id": reply_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, "usage": usage(*[r for r, _ in started])}

        def chunk(index: int, text: str, finish_reason: Optional[str] = None) -> dict:
            return {"data": json.dumps({"id": reply_id, "object": "text_completion", "created": created,
                                        "model": model_name, "choices": [choice(index, text, finish_reason, None)]})}

        async def events() -> AsyncIterator[dict]:
            try:
                merged: asyncio.Queue = asyncio.Queue()

                async def forward(index: int, pending: _Pending) -> None:
                    while True:
                        text = await pending.next_text()
                        await merged.put((index, text))
                        if not text and started[index][0].finished:
                            return

                tasks = [asyncio.create_task(forward(i, p)) for i, (_, p) in enumerate(started)]
                for index, (request, _) in enumerate(started):
                    if body.echo:
                        yield chunk(index, prompt_text(request))
                remaining = len(started)
                while remaining:
                    index, text = await merged.get()
                    request = started[index][0]
                    if text:
                        yield chunk(index, text)
                    elif request.finished:
                        raise_if_failed(request)
                        remaining -= 1
                        yield chunk(index, "", request.sequence.finish_reason)
                if body.include_usage:
                    yield {"data": json.dumps({"id": reply_id, "object": "text_completion", "created": created,
                                               "model": model_name, "choices": [],
                                               "usage": usage(*[r for r, _ in started])})}
                yield {"data": "[DONE]"}
                await asyncio.gather(*tasks)
            finally:
                for request, _ in started:
                    request.cancel()
                    finish(request)

        return EventSourceResponse(events(), ping=15)

    # -- the rest -------------------------------------------------------------------------------------------
    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "llama"}]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorize)])
    async def model(name: str):
        check_model(name)
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "llama"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return resources.files("llama").joinpath("chat.html").read_text(encoding="utf-8")

    return app


def generated_count(request: Request) -> int:
    """Tokens the model generated for `request`, a stop token included."""
    return len(request.tokens) - len(request.prompt)


def usage(*requests: Request) -> dict:
    prompt = sum(len(r.prompt) for r in requests)
    completion = sum(generated_count(r) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def raise_if_failed(request: Request) -> None:
    if request.error is not None:
        raise APIError(500, f"generation failed: {request.error}")
