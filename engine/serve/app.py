"""The HTTP side: OpenAI's /v1/chat/completions, /v1/completions and /v1/models over the scheduler, plus
/health. Requests are checked here (types, ranges, what we do not support), turned into prompt ids and a
policy, and handed to the scheduler; its events come back as one JSON body or as server-sent events.
Every error, ours or the framework's, is OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..generate import SamplingParams
from ..llm import LLM
from ..policies import Policy, list_policies, make_policy
from .scheduler import Done, Event, Failed, QueueFull, Request, Scheduler

# OpenAI fields that change nothing here (accepted and ignored), and those we refuse rather than ignore
IGNORED = {"model", "stream", "stream_options", "user", "metadata", "store", "service_tier", "parallel_tool_calls"}
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "logit_bias", "audio", "modalities",
               "prediction", "reasoning_effort", "web_search_options", "echo", "suffix", "top_logprobs"}
SAMPLING = {"messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
            "top_k", "n", "best_of", "logprobs", "presence_penalty", "frequency_penalty", "response_format",
            "policy"}


class ApiError(Exception):
    """A request we answer with an error: status, one-line message, OpenAI's type, param and code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class Settings:
    """What the server's flags decide: names the model answers to, defaults and limits."""

    model_names: tuple[str, ...]  # the first is the one /v1/models lists
    policy: str = "full"
    policy_defaults: dict[str, object] = field(default_factory=dict)  # the flags' parameters of `policy`
    max_tokens: int = 256  # when a request gives none
    max_prompt_tokens: int = 8192
    request_timeout: float = 600.0
    max_body_bytes: int = 1 << 20
    api_key: str | None = None


# ---- checking a request ----------------------------------------------------------------------------

def _get(body: dict, name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    """body[name] if present and of `kinds` (no bool for a number), else a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"{name} must be {what}, got {json.dumps(value)[:60]}", param=name)
    return value


def _refuse_unsupported(body: dict) -> None:
    """n > 1, tools, logprobs and the like: a 400 that says we do not do them (never silently ignored)."""
    for name in sorted(UNSUPPORTED & body.keys()):
        if body[name] not in (None, [], {}, False):
            raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported")
    for name in ("n", "best_of"):
        if _get(body, name, (int,), "an integer", 1) != 1:
            raise ApiError(400, f"{name} must be 1: this server returns one choice per request", param=name,
                           code="unsupported")
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs", code="unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), "a number", 0) != 0:
            raise ApiError(400, f"{name} is not supported by this server (only 0)", param=name, code="unsupported")
    fmt = _get(body, "response_format", (dict,), "an object", {"type": "text"})
    if fmt.get("type") != "text":
        raise ApiError(400, "response_format other than text is not supported", param="response_format",
                       code="unsupported")


def sampling(body: dict, settings: Settings) -> SamplingParams:
    """The request's sampling fields, checked by SamplingParams (a ValueError there is a 400 too)."""
    max_tokens = _get(body, "max_tokens", (int,), "an integer", None)
    max_tokens = _get(body, "max_completion_tokens", (int,), "an integer", max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    stop = _get(body, "stop", (str, list), "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", param="stop")
    try:
        return SamplingParams(
            max_new_tokens=settings.max_tokens if max_tokens is None else max_tokens,
            temperature=_get(body, "temperature", (int, float), "a number", 1.0),
            top_p=_get(body, "top_p", (int, float), "a number", 1.0),
            top_k=_get(body, "top_k", (int,), "an integer", 0),
            seed=_get(body, "seed", (int,), "an integer", None), stop=tuple(stop))
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def policy(body: dict, settings: Settings) -> Policy:
    """The request's policy: `policy` (default the server's) with the server's parameters for it, and the
    request's own fields beyond OpenAI's (`budget`, `sinks`, `recent`, a policy's parameters) on top."""
    name = _get(body, "policy", (str,), "a policy name", settings.policy)
    if name not in list_policies():
        raise ApiError(400, f"unknown policy {name!r}; valid: {', '.join(list_policies())}", param="policy",
                       code="policy_not_found")
    if name == settings.policy:
        params = dict(settings.policy_defaults)
    elif name == "full":
        params = {}
    else:  # another policy: the flags' common parameters; the server policy's own ones may not apply
        params = {k: v for k, v in settings.policy_defaults.items() if k in ("budget", "sinks", "recent", "positions")}
    params |= {k: v for k, v in body.items() if k not in IGNORED | UNSUPPORTED | SAMPLING}
    try:
        return make_policy(name, **params)
    except ValueError as e:  # PolicyError: an unknown parameter, a wrong type, budget <= sinks + recent
        raise ApiError(400, str(e), param="policy") from None


def _message(m: Any, i: int) -> dict[str, str]:
    """A chat message as the tokenizer takes it: content a string, or OpenAI's list of text parts."""
    if not isinstance(m, dict):
        raise ApiError(400, f"messages[{i}] must be an object with role and content", param="messages")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
        content = "".join(p["text"] for p in content)
    return {"role": m.get("role"), "content": content}


def prompt_ids(body: dict, llm: LLM, chat: bool) -> list[int]:
    """The prompt as ids: the chat template over `messages`, or `prompt` (text, or a list of token ids)
    encoded as LLM.generate encodes it."""
    tok = llm.tokenizer
    try:
        if chat:
            messages = _get(body, "messages", (list,), "a list of messages", None)
            if messages is None:
                raise ApiError(400, "messages is required", param="messages")
            return tok.apply_chat([_message(m, i) for i, m in enumerate(messages)])
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return llm._ids(prompt)[0].tolist()
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return llm._ids(prompt)[0].tolist()  # ids checked against the vocabulary
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", param="prompt")
    except ValueError as e:  # TextError (not valid Unicode), a malformed chat, ids outside the vocabulary
        raise ApiError(400, str(e), param="messages" if chat else "prompt") from None


# ---- limits -----------------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413 (declared or streamed), before any handler
    reads it into memory."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await self._error().response()(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self._error()
            return message

        await self.app(scope, counted, send)

    def _error(self) -> ApiError:
        return ApiError(413, f"request body over the server's limit of {self.limit} bytes", code="body_too_large")


class EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends: finished, or the client gone
    (the scheduler then drops the request at its next step)."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# ---- the app ----------------------------------------------------------------------------------------

def create_app(llm: LLM, scheduler: Scheduler, settings: Settings) -> FastAPI:
    """The OpenAI-compatible app over a running scheduler."""
    app = FastAPI(title="engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    key = settings.api_key.encode() if settings.api_key else None

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HttpRequest, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def server_error(_: HttpRequest, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

    async def authorized(request: HttpRequest) -> None:
        """Bearer key compared in constant time (every route but /health, which load balancers poll)."""
        if key is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
                raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")

    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **scheduler.load()}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_names[0], "object": "model", "created": 0,
                                            "owned_by": "engine"}]}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: HttpRequest) -> Any:
        return await complete(request, chat=True)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: HttpRequest) -> Any:
        return await complete(request, chat=False)

    async def complete(http: HttpRequest, chat: bool) -> Any:
        body = await _json_body(http)
        model = _get(body, "model", (str,), "a string", settings.model_names[0])
        if model not in settings.model_names:
            raise ApiError(404, f"unknown model {model!r}; this server has {settings.model_names[0]!r}",
                           param="model", code="model_not_found")
        stream = _get(body, "stream", (bool,), "true or false", False)
        _refuse_unsupported(body)
        params, pol = sampling(body, settings), policy(body, settings)
        ids = prompt_ids(body, llm, chat)
        if len(ids) > settings.max_prompt_tokens:
            raise ApiError(400, f"prompt of {len(ids)} tokens exceeds the server's limit of "
                           f"{settings.max_prompt_tokens} (--max-prompt-tokens)",
                           param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:  # from the scheduler's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

        deadline = time.monotonic() + settings.request_timeout
        req = Request(ids, params, pol, emit, deadline)
        try:
            scheduler.submit(req)
        except QueueFull as e:
            raise ApiError(503, str(e), "server_error", code="queue_full", headers={"Retry-After": "1"}) from None
        reply = Reply(chat, model, events, req, http, deadline)
        first = await reply.next()  # prefill errors are still an HTTP status
        if isinstance(first, Failed):
            raise ApiError(first.status, first.message, first.kind)
        if stream:
            return EventStream(reply.sse(first), req.cancel)
        try:
            return await reply.whole(first)
        finally:
            req.cancel()  # a no-op once it ended; otherwise the client left or it timed out

    return app


async def _json_body(http: HttpRequest) -> dict:
    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object")
    return body


class Reply:
    """A request's events turned into OpenAI's response: one object, or its chunks as server-sent events."""

    def __init__(self, chat: bool, model: str, events: asyncio.Queue, req: Request, http: HttpRequest,
                 deadline: float):
        self.chat, self.model, self.events, self.req, self.http = chat, model, events, req, http
        self.deadline = deadline
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    async def next(self) -> Event:
        """The next event; a timeout or a client gone while waiting (checked every second) ends the request."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.req.cancel()
                return Failed(408, "request timed out (--request-timeout)", "timeout")
            try:
                return await asyncio.wait_for(self.events.get(), min(1.0, left))
            except asyncio.TimeoutError:
                if await self.http.is_disconnected():
                    self.req.cancel()
                    return Failed(499, "request cancelled by the client")

    async def whole(self, first: Event) -> JSONResponse:
        pieces, event = [], first
        while isinstance(event, str):
            pieces.append(event)
            event = await self.next()
        if isinstance(event, Failed):
            raise ApiError(event.status, event.message, event.kind)
        text = "".join(pieces)
        choice = ({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return JSONResponse(self._body([{"index": 0, **choice, "finish_reason": event.finish_reason,
                                         "logprobs": None}], event))

    async def sse(self, first: Event) -> AsyncIterator[str]:
        """data: chunk lines, the last chunk with finish_reason, usage and engine, then data: [DONE]. An error
        after the first token (a timeout) is an error object in the stream."""
        if self.chat:
            yield self._chunk({"role": "assistant", "content": ""}, None)
        event = first
        while isinstance(event, str):
            yield self._chunk({"content": event} if self.chat else event, None)
            event = await self.next()
        if isinstance(event, Failed):
            yield _sse(ApiError(event.status, event.message, event.kind).response().body.decode())
        else:
            yield self._chunk({} if self.chat else "", event.finish_reason, event)
        yield _sse("[DONE]")

    def _chunk(self, delta: dict | str, finish: str | None, done: Done | None = None) -> str:
        choice = {"delta": delta} if self.chat else {"text": delta}
        body = self._body([{"index": 0, **choice, "finish_reason": finish, "logprobs": None}], done, chunk=True)
        return _sse(json.dumps(body))

    def _body(self, choices: list[dict], done: Done | None, chunk: bool = False) -> dict:
        kind = "chat.completion" + (".chunk" if chunk else "") if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if done is not None:
            body["usage"] = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                             "total_tokens": done.prompt_tokens + done.completion_tokens}
            body["engine"] = done.engine
        return body


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


@contextlib.contextmanager
def serving(app: ASGIApp, host: str = "127.0.0.1") -> Iterator[str]:
    """`app` under uvicorn in a thread on a free port of `host`, for tests and the benchmark; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
