"""The OpenAI-compatible HTTP API on rank 0 (FastAPI), and the health, readiness and metrics.

`create_app` builds the app around a `Gateway` (the scheduler's thread-safe side). Handlers
validate and tokenise a request here, in the HTTP thread, then submit it; the main thread's
scheduler sends its text back as events, which reach the handler's event loop through
`call_soon_threadsafe`. The app never touches MLX.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and every
answer carries an ``x-request-id`` header; a 500 names it in its message, and the log line
with the traceback names it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .errors import UsageError
from .generation import encode_messages, encode_text
from .scheduler import Delta, Event, Finished, Job, QueueFull
from .scheduler import Request as Work
from .serve_metrics import CONTENT_TYPE, ServeMetrics

logger = logging.getLogger(__name__)

# OpenAI's limit on stop sequences.
MAX_STOPS = 4
# Seconds a client told 429 should wait before trying again.
RETRY_AFTER_SECONDS = 1
# A request id a client may choose: it is echoed in headers and written to the logs.
_PLAIN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# How often a handler waiting for a whole answer checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.5
# Paths open without the API key: probes and scrapers rarely carry one, and the chat page
# (static; it sends the key its user types with its own API calls).
OPEN_PATHS = ("/", "/health", "/ready", "/metrics")


class Gateway(Protocol):
    """What the API needs from the scheduler (any thread may call these)."""

    def submit(self, request: Work) -> None: ...
    def cancel(self, request_id: str) -> None: ...
    def ready(self) -> tuple[bool, str]: ...

    @property
    def queue_depth(self) -> int: ...


@dataclass(frozen=True)
class ApiSettings:
    """The model the API serves and the limits it enforces."""

    model_id: str
    context_length: int | None
    max_tokens: int
    max_body_bytes: int
    api_key: str | None = None
    chat_template: bool = True
    # Used where a request leaves them out (generation.temperature, generation.top_p).
    temperature: float = 0.0
    top_p: float = 1.0
    # What `/v1/cluster` says of the ranks (distributed.strategy; how many ranks).
    strategy: str = "single"
    world_size: int = 1


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers or {}

    def response(self, request_id: str) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }
        headers = {**self.headers, "x-request-id": request_id}
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass(frozen=True)
class _Parsed:
    """A validated request: its job for the ranks, stop strings, and how to answer."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool


def create_app(
    gateway: Gateway, tokenizer: Any, settings: ApiSettings, metrics: ServeMetrics
) -> FastAPI:
    """The FastAPI app of the server.

    Args:
        gateway: The scheduler.
        tokenizer: A tokenizer for this thread alone (the main thread decodes with its own).
        settings: Model id, context, limits and the optional API key.
        metrics: Where requests are counted.
    """
    app = FastAPI(title="mlxnode", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=settings.api_key, metrics=metrics)
    _add_error_handlers(app)
    _add_operations(app, gateway, settings, metrics)
    _add_openai_api(app, gateway, tokenizer, settings)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, with the request id."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response(request.state.request_id)

    @app.exception_handler(404)
    async def not_found(request: Request, _e: Exception) -> JSONResponse:
        return ApiError(404, f"no such endpoint: {request.url.path}", code="not_found").response(
            request.state.request_id
        )

    @app.exception_handler(405)
    async def wrong_method(request: Request, _e: Exception) -> JSONResponse:
        message = f"{request.method} is not allowed on {request.url.path}"
        return ApiError(405, message, code="method_not_allowed").response(request.state.request_id)


def _add_operations(
    app: FastAPI, gateway: Gateway, settings: ApiSettings, metrics: ServeMetrics
) -> None:
    """The chat page, health, readiness, metrics and what serves the model."""
    chat_page = _chat_page()

    @app.get("/")
    async def chat_ui() -> HTMLResponse:
        return HTMLResponse(chat_page)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok, why = gateway.ready()
        metrics.ready.set(1 if ok else 0)
        if ok:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "reason": why}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(gateway.queue_depth)
        metrics.ready.set(1 if gateway.ready()[0] else 0)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/cluster")
    async def cluster() -> dict[str, Any]:
        # Hosts are known once the first readiness probe has gathered every rank's memory.
        return {
            "object": "cluster",
            "model": settings.model_id,
            "strategy": settings.strategy,
            "world_size": settings.world_size,
            "ranks": metrics.ranks,
        }


def _add_openai_api(app: FastAPI, gateway: Gateway, tokenizer: Any, settings: ApiSettings) -> None:
    """The model list and the two completion endpoints."""

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "mlxnode"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _json_body(request, settings.max_body_bytes)
        ids = _chat_ids(tokenizer, body, settings.chat_template)
        return await _generate(gateway, settings, request, body, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _json_body(request, settings.max_body_bytes)
        ids = _prompt_ids(tokenizer, body)
        return await _generate(gateway, settings, request, body, ids, chat=False)


async def _generate(
    gateway: Gateway,
    settings: ApiSettings,
    request: Request,
    body: dict[str, Any],
    ids: list[int],
    *,
    chat: bool,
) -> Response:
    """Queue one request on the scheduler; its answer streamed or whole, as asked."""
    parsed = _parse(body, ids, settings)
    request_id = _new_id("chatcmpl" if chat else "cmpl")
    events: asyncio.Queue[Event] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def emit(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the server stops
            loop.call_soon_threadsafe(events.put_nowait, event)

    work = Work(
        job=Job(
            id=request_id,
            ids=parsed.ids,
            max_tokens=parsed.max_tokens,
            temperature=parsed.temperature,
            top_p=parsed.top_p,
            seed=parsed.seed,
        ),
        emit=emit,
        stop=parsed.stop,
    )
    try:
        gateway.submit(work)
    except QueueFull:
        raise ApiError(
            429,
            "the server is busy: too many requests are waiting; retry later",
            code="queue_full",
            kind="rate_limit_error",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        ) from None
    answer = _Answer(request_id, settings.model_id, chat=chat)
    if parsed.stream:
        stream = _stream(events, answer, parsed, gateway, request.state.request_id)
        return StreamingResponse(stream, media_type="text/event-stream")
    return await _collect(events, answer, gateway, request)


def _chat_page() -> str:
    """The chat page (mlxnode/static/chat.html, package data)."""
    return resources.files("mlxnode").joinpath("static/chat.html").read_text(encoding="utf-8")


class _Guard:
    """ASGI middleware: a request id on every answer, the API key, the count by status, and
    any unexpected error as a 500 naming the request id.

    Plain ASGI rather than Starlette's `BaseHTTPMiddleware`, which hides a client's
    disconnect from the handler that waits for a whole answer.
    """

    def __init__(self, app: Any, *, api_key: str | None, metrics: ServeMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        # A client's own id is kept (to find its request in the logs) if it is plain.
        request_id = given if _PLAIN_ID.fullmatch(given) else _new_id("req")
        scope.setdefault("state", {})["request_id"] = request_id
        path, status = scope["path"], None

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = (
                    []
                    if any(k == b"x-request-id" for k, _ in message.get("headers", []))
                    else [(b"x-request-id", request_id.encode("latin-1"))]
                )
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            if path not in OPEN_PATHS:
                _check_key(headers.get("authorization", ""), self.api_key)
            await self.app(scope, receive, send_with_id)
        except ApiError as e:
            await e.response(request_id)(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - the boundary: any bug becomes a 500 naming the id
            logger.exception("request %s failed", request_id)
            if status is None:
                await _internal(request_id)(scope, receive, send_with_id)
        finally:
            if path.startswith("/v1/") and status is not None:
                self.metrics.requests.labels(path, str(status)).inc()


def _check_key(given: str, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise ApiError(
            401,
            "a valid API key is needed: send `Authorization: Bearer KEY`",
            code="invalid_api_key",
        )


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read up to `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _chat_ids(tokenizer: Any, body: dict[str, Any], chat_template: bool) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "give a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "each message needs a string role")
        clean.append({"role": m["role"], "content": _content(m.get("content"), i)})
    if not any(m["content"].strip() for m in clean):
        raise _bad("messages", "every message is empty; give some text")
    if chat_template and tokenizer.has_chat_template:
        try:
            return encode_messages(tokenizer, clean)
        except UsageError as e:
            raise _bad("messages", str(e)) from None
    # No template: the contents one after another, as a plain prompt.
    return encode_text(tokenizer, "\n".join(m["content"] for m in clean), chat_template=False)


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {type: text, text} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{i}].content", "give a string, or a list of text parts")


def _prompt_ids(tokenizer: Any, body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        vocab = len(tokenizer.vocab) if hasattr(tokenizer, "vocab") else None
        if any(t < 0 or (vocab is not None and t >= vocab) for t in prompt):
            raise _bad("prompt", "a token id is outside the model's vocabulary")
        return list(prompt)
    if not isinstance(prompt, str):
        raise _bad("prompt", "give one string (or a list of token ids); batches are not served")
    if not prompt.strip():
        raise _bad("prompt", "the prompt is empty; give some text")
    return encode_text(tokenizer, prompt, chat_template=False)


def _parse(body: dict[str, Any], ids: list[int], settings: ApiSettings) -> _Parsed:
    """Check the sampling fields of `body` and the prompt's length against the context."""
    if not ids:
        # Every rank's generator would refuse an empty prompt; refuse it here instead.
        raise _bad("messages" if "messages" in body else "prompt", "the prompt has no tokens")
    n = body.get("n", 1)
    if n is not None and (type(n) is not int or n != 1):
        raise _bad("n", "only n=1 is served")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "give true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "give an object")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = settings.max_tokens if limit is None else _int("max_tokens", limit, low=1)
    temperature = _number(
        "temperature", body.get("temperature"), settings.temperature, low=0.0, high=2.0
    )
    top_p = _number("top_p", body.get("top_p"), settings.top_p, low=0.0, high=1.0)
    if top_p <= 0:
        raise _bad("top_p", "must be greater than 0")
    seed = body.get("seed")
    seed = secrets.randbits(63) if seed is None else _int("seed", seed, low=0, high=2**63 - 1)
    stop = _stops(body.get("stop"))
    context = settings.context_length
    if context is not None:
        if len(ids) >= context:
            raise ApiError(
                413,
                f"the prompt is {len(ids)} tokens but {settings.model_id} takes at most "
                f"{context} tokens of context, leaving no room to generate; shorten it",
                param="messages" if "messages" in body else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = min(max_tokens, context - len(ids))
    return _Parsed(
        ids=ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        stream=bool(stream),
        include_usage=bool(options.get("include_usage")),
    )


def _int(param: str, value: Any, *, low: int, high: int | None = None) -> int:
    if type(value) is not int:
        raise _bad(param, f"give an integer, not {json.dumps(value)[:40]}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise _bad(param, f"must be {bounds}, got {value}")
    return value


def _number(param: str, value: Any, default: float, *, low: float, high: float) -> float:
    if value is None:
        return default
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _bad(param, f"give a number, not {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise _bad(param, f"must be between {low:g} and {high:g}, got {value}")
    return float(value)


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "give a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise _bad("stop", f"give at most {MAX_STOPS} stop sequences")
    return [s for s in stops if s]


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _internal(request_id: str) -> JSONResponse:
    return ApiError(
        500,
        f"internal error; the server's log names request {request_id}",
        code="internal_error",
        kind="server_error",
    ).response(request_id)


class _Answer:
    """OpenAI's response objects for one request, chat or completion."""

    def __init__(self, request_id: str, model: str, *, chat: bool):
        self.id, self.model, self.chat = request_id, model, chat
        self.created = int(time.time())

    def _object(self, chunk: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    def _base(self, chunk: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self._object(chunk),
            "created": self.created,
            "model": self.model,
        }

    def chunk(self, text: str | None, finish_reason: str | None, *, first: bool = False):
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        return {**self._base(True), "choices": [choice]}

    def usage_chunk(self, done: Finished) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": _usage(done)}

    def whole(self, text: str, done: Finished) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
            }
        else:
            choice = {"index": 0, "text": text}
        choice["logprobs"] = None
        choice["finish_reason"] = done.finish_reason
        return {**self._base(False), "choices": [choice], "usage": _usage(done)}


def _usage(done: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


async def _collect(
    events: asyncio.Queue[Event], answer: _Answer, gateway: Gateway, request: Request
) -> Response:
    """The whole answer; a client that goes away meanwhile cancels the request."""
    http_id = request.state.request_id
    pieces: list[str] = []
    finished = False
    checked = time.monotonic()
    try:
        while True:
            # Tokens may keep coming for a client long gone: look at the clock, not for a lull.
            if time.monotonic() - checked > DISCONNECT_POLL_SECONDS:
                checked = time.monotonic()
                if await request.is_disconnected():
                    logger.info("request %s: the client went away", http_id)
                    return Response(status_code=499)  # nobody reads it
            try:
                event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                continue
            if isinstance(event, Delta):
                pieces.append(event.text)
            elif isinstance(event, Finished):
                finished = True
                return JSONResponse(answer.whole("".join(pieces), event))
            else:
                finished = True
                logger.error("request %s (%s) failed: %s", http_id, answer.id, event.message)
                return _internal(http_id)
    finally:
        if not finished:
            gateway.cancel(answer.id)


async def _stream(
    events: asyncio.Queue[Event],
    answer: _Answer,
    parsed: _Parsed,
    gateway: Gateway,
    http_id: str,
) -> AsyncIterator[bytes]:
    """Server-sent events: OpenAI's chunks, then ``data: [DONE]``.

    A client that goes away cancels this generator; the request leaves the batch then.
    """
    finished = False
    try:
        if answer.chat:
            yield _sse(answer.chunk("", None, first=True))  # the role, as OpenAI sends it
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                if event.text:
                    yield _sse(answer.chunk(event.text, None))
            elif isinstance(event, Finished):
                finished = True
                yield _sse(answer.chunk(None, event.finish_reason))
                if parsed.include_usage:
                    yield _sse(answer.usage_chunk(event))
                break
            else:
                finished = True
                logger.error("request %s (%s) failed: %s", http_id, answer.id, event.message)
                error = {
                    "error": {
                        "message": f"internal error; the server's log names request {http_id}",
                        "type": "server_error",
                        "param": None,
                        "code": "internal_error",
                    }
                }
                yield _sse(error)
                break
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:
            gateway.cancel(answer.id)


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
