"""`lionkd serve`: any `Backend` behind an OpenAI-compatible HTTP API.

Routes: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`, with `n`, `stop`,
`seed`, logprobs in OpenAI's formats (chat: `logprobs.content[]`; completions: the legacy lists),
`usage`, and server-sent events when `stream` is true. Errors use OpenAI's error body: 400 for a bad
body (an unknown message role; a prompt that with `max_tokens` does not fit the model's context, as
vLLM answers it, never cut to fit), 401 for a missing or wrong bearer key, 404 for an unknown model or
route, 405 for a wrong method.

Requests that arrive within a few milliseconds of each other are handed to the backend as one batch
(`MicroBatcher`), one batch at a time per model: a local model then runs batched generation for
concurrent clients instead of one request after another. A streamed plain request (one sample, no
beams or logprobs) to a model folder is sent as it is generated (`StreamingHFBackend`); any other
streamed reply is generated first and then sent in token-sized pieces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hmac
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from .base import Backend, Choice, GenRequest, GenResult, TokenLogprob

DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    num_beams: int = Field(1, ge=1, le=64)  # an extension for local models

    def params(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "max_tokens": self.max_tokens or DEFAULT_MAX_TOKENS,
            "n": self.n, "stop": tuple(stop), "seed": self.seed, "num_beams": self.num_beams,
        }

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


ROLES = ("system", "user", "assistant")  # what the chat templates render; "developer" is OpenAI's new "system"


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role == "developer":
            return "system"
        if role not in ROLES:
            raise ValueError(f"unknown role '{role}' (this server reads {', '.join(ROLES)} and developer)")
        return role

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def request(self) -> GenRequest:
        params = self.params()
        params["max_tokens"] = self.max_completion_tokens or params["max_tokens"]
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return GenRequest.chat([{"role": m.role, "content": m.text()} for m in self.messages],
                               logprobs=logprobs, **params)


class CompletionBody(_Body):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)

    def requests(self) -> list[GenRequest]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        return [GenRequest(prompt=p, logprobs=self.logprobs, **self.params()) for p in prompts]


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise APIError(400, f"'{where}': {err['msg']}") from None


# --------------------------------------------------------------------------- batching


class MicroBatcher:
    """Collects requests that arrive within `wait_s` (up to `max_batch`) into one backend call."""

    def __init__(self, backend: Backend, max_batch: int = 16, wait_s: float = 0.005) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._queue: asyncio.Queue[tuple[GenRequest, asyncio.Future[GenResult]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, requests: list[GenRequest]) -> list[GenResult]:
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        for req, fut in zip(requests, futures, strict=True):
            self._queue.put_nowait((req, fut))
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        assert self._queue is not None
        queue, loop = self._queue, asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:
                results = await self.backend.agenerate([req for req, _ in batch])
            except Exception as exc:  # the clients get a 500, the worker lives on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)


# --------------------------------------------------------------------------- response bodies


def _token_entry(token: str, logprob: float, raw: list[int] | None = None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")) if raw is None else raw}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's `logprobs` of a chat choice; a backend that knows its tokens' raw bytes sends those."""
    def entry(t: TokenLogprob) -> dict[str, Any]:
        top_bytes = getattr(t, "top_bytes", None) or [None] * len(t.top)
        return _token_entry(t.token, t.logprob, getattr(t, "bytes", None)) | {
            "top_logprobs": [_token_entry(a, b, raw) for (a, b), raw in zip(t.top, top_bytes, strict=True)]}

    return {"content": [entry(t) for t in tokens], "refusal": None}


def legacy_logprobs(tokens: list[TokenLogprob], start: int = 0) -> dict[str, Any]:
    offsets, at = [], start
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def _usage(results: list[GenResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _pieces(choice: Choice) -> Iterator[tuple[str, list[TokenLogprob] | None]]:
    """The reply cut into stream pieces: one per token where the tokens spell the text, else words."""
    tokens = choice.logprobs
    if tokens and "".join(t.token for t in tokens) == choice.text:
        for t in tokens:
            yield t.token, [t]
        return
    words = re.findall(r"\s*\S+|\s+", choice.text)
    for i, word in enumerate(words):
        yield word, (tokens if i == 0 else None)
    if not words and tokens:
        yield "", tokens


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# --------------------------------------------------------------------------- the app


def create_app(
    models: dict[str, Backend], api_key: str | None = None, *, max_batch: int | None = None,
    batch_wait_s: float = 0.005,
) -> FastAPI:
    """An OpenAI-compatible app serving each backend under its name in `models`."""
    app = FastAPI(title="lionkd", docs_url=None, redoc_url=None)
    batchers = {
        name: MicroBatcher(b, max_batch or int(getattr(b, "batch_size", 16)), batch_wait_s)
        for name, b in models.items()
    }

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # an unknown route or a wrong method: OpenAI's error body, like every other error here
        what = {404: f"unknown route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, what.get(exc.status_code, str(exc.detail)), code=code).response()

    @app.middleware("http")
    async def _check_key(request: Request, call_next: Any) -> Any:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return APIError(401, "invalid or missing API key", code="invalid_api_key").response()
        return await call_next(request)

    def batcher(model: str) -> MicroBatcher:
        if model not in batchers:
            raise APIError(404, f"the model '{model}' does not exist (served: {', '.join(models)})",
                           code="model_not_found")
        return batchers[model]

    async def run(model: str, requests: list[GenRequest]) -> list[GenResult]:
        for req in requests:
            check_context(models.get(model), req)
        try:
            results = await batcher(model).submit(requests)
        except APIError:
            raise
        except Exception as exc:
            raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error") from None
        failed = next((r for r in results if not r.ok), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}", "server_error")
        return results

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "lionkd"} for name in models
        ]}

    def live(model: str, req: GenRequest) -> Any:
        """The backend's live text stream for `req`, or None (then a reply is generated, then streamed)."""
        batcher(model)  # 404 for an unknown model
        stream_text = getattr(models[model], "stream_text", None)
        if stream_text is None or not (req.n == 1 and req.num_beams == 1 and req.logprobs is None):
            return None
        check_context(models[model], req)
        return stream_text(req)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body: ChatBody = await _parse(request, ChatBody)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        pieces = live(body.model, body.request()) if body.stream else None
        if pieces is not None:
            return StreamingResponse(_live_chat_events(head, pieces, body.include_usage),
                                     media_type="text/event-stream")
        (result,) = await run(body.model, [body.request()])
        if body.stream:
            return StreamingResponse(_chat_events(head, result, body.include_usage), media_type="text/event-stream")
        return head | {
            "object": "chat.completion",
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": c.text},
                 "logprobs": chat_logprobs(c.logprobs) if body.logprobs and c.logprobs is not None else None,
                 "finish_reason": c.finish_reason}
                for i, c in enumerate(result.choices)
            ],
            "usage": _usage([result]),
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body: CompletionBody = await _parse(request, CompletionBody)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        requests = body.requests()
        pieces = live(body.model, requests[0]) if body.stream and len(requests) == 1 else None
        if pieces is not None:
            return StreamingResponse(_live_completion_events(head, pieces, body.include_usage),
                                     media_type="text/event-stream")
        results = await run(body.model, requests)
        choices = [c for r in results for c in r.choices]
        if body.stream:
            return StreamingResponse(_completion_events(head, choices, results, body.include_usage),
                                     media_type="text/event-stream")
        return head | {
            "object": "text_completion",
            "choices": [
                {"index": i, "text": c.text, "finish_reason": c.finish_reason,
                 "logprobs": legacy_logprobs(c.logprobs) if body.logprobs is not None and c.logprobs else None}
                for i, c in enumerate(choices)
            ],
            "usage": _usage(results),
        }

    return app


def check_context(backend: Backend | None, req: GenRequest) -> None:
    """A 400 naming the limit when the prompt plus `max_tokens` does not fit the model's context (as vLLM
    answers); the backend would otherwise cut the prompt to fit and answer another question."""
    limit = getattr(backend, "max_positions", None)
    encode = getattr(backend, "encode", None)
    if not limit or encode is None:
        return
    # with max_tokens 0 the backend cuts nothing shorter than its whole context: a prompt that long is too long
    prompt = len(encode(dataclasses.replace(req, max_tokens=0)))
    if prompt + req.max_tokens > limit:
        given = f"{prompt}" if prompt < limit else f"at least {prompt}"
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{'at least ' if prompt >= limit else ''}{prompt + req.max_tokens} tokens ({given} in "
                            f"the prompt, {req.max_tokens} in the completion). Please reduce the length of the "
                            "prompt or max_tokens.", code="context_length_exceeded")


async def _live_chat_events(head: dict[str, Any], pieces: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse(head | {"object": "chat.completion.chunk", "choices": choices} | extra)

    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
    async for piece in pieces:
        if isinstance(piece, GenResult):
            yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": piece.choices[0].finish_reason}])
            if include_usage:
                yield chunk([], usage=_usage([piece]))
        else:
            yield chunk([{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}])
    yield _sse("[DONE]")


async def _live_completion_events(
    head: dict[str, Any], pieces: AsyncIterator[Any], include_usage: bool
) -> AsyncIterator[str]:
    def chunk(items: list[dict[str, Any]], **extra: Any) -> str:
        return _sse(head | {"object": "text_completion", "choices": items} | extra)

    async for piece in pieces:
        if isinstance(piece, GenResult):
            yield chunk([{"index": 0, "text": "", "finish_reason": piece.choices[0].finish_reason, "logprobs": None}])
            if include_usage:
                yield chunk([], usage=_usage([piece]))
        else:
            yield chunk([{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}])
    yield _sse("[DONE]")


async def _chat_events(head: dict[str, Any], result: GenResult, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse(head | {"object": "chat.completion.chunk", "choices": choices} | extra)

    for i, c in enumerate(result.choices):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
        for piece, tokens in _pieces(c):
            yield chunk([{"index": i, "delta": {"content": piece},
                          "logprobs": chat_logprobs(tokens) if tokens else None, "finish_reason": None}])
        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])
    if include_usage:
        yield chunk([], usage=_usage([result]))
    yield _sse("[DONE]")


async def _completion_events(
    head: dict[str, Any], choices: list[Choice], results: list[GenResult], include_usage: bool
) -> AsyncIterator[str]:
    def chunk(items: list[dict[str, Any]], **extra: Any) -> str:
        return _sse(head | {"object": "text_completion", "choices": items} | extra)

    for i, c in enumerate(choices):
        at = 0
        for piece, tokens in _pieces(c):
            yield chunk([{"index": i, "text": piece, "finish_reason": None,
                          "logprobs": legacy_logprobs(tokens, at) if tokens else None}])
            at += len(piece)
        yield chunk([{"index": i, "text": "", "finish_reason": c.finish_reason, "logprobs": None}])
    if include_usage:
        yield chunk([], usage=_usage(results))
    yield _sse("[DONE]")


# --------------------------------------------------------------------------- running it


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, the demo); port 0 picks a free port.

    with ServerThread(create_app({"student": backend})) as server:
        OpenAIBackend("student", base_url=server.base_url)
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> None:
        self.host = host
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=1, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="lionkd-server", daemon=True)
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:  # uvicorn sets `started` once its sockets listen
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        sock: socket.socket = self.server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)


def serve(
    model_dir: str | None = None,
    *,
    sandbox: bool = False,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    template: str = "chat",
    dtype: str = "auto",
    device: str = "auto",
    batch_size: int = 16,
) -> None:
    """Serve a local model directory and/or the sandbox world until interrupted (`lionkd serve`)."""
    models = build_models(model_dir, sandbox=sandbox, name=name, template=template, dtype=dtype, device=device,
                          batch_size=batch_size)
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env: the environment variable ${api_key_env} is not set")
    sock = listen(host, port)
    port = sock.getsockname()[1]
    auth = "bearer key required" if api_key else "no key required"
    print(f"serving {', '.join(models)} at http://{host}:{port}/v1 ({auth}); Ctrl-C stops", flush=True)
    config = uvicorn.Config(create_app(models, api_key), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything says "serving": a port in use is one line, not a uvicorn error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise UserError(f"--host: cannot resolve '{host}' ({exc.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a just-closed port is free
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"--port: {host}:{port} is already in use; stop what listens there or choose "
                            "another --port") from None
        raise UserError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_models(
    model_dir: str | None, *, sandbox: bool = False, name: str | None = None, template: str = "chat",
    dtype: str = "auto", device: str = "auto", batch_size: int = 16,
) -> dict[str, Backend]:
    if model_dir is None and not sandbox:
        raise UserError("serve: give a MODEL_DIR, or --sandbox for the offline sandbox world")
    if template not in ("chat", "alpaca"):
        raise UserError(f"--template: '{template}' is not one of chat, alpaca")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype: '{dtype}' is not one of auto, float32, bfloat16, float16")
    models: dict[str, Backend] = {}
    if sandbox:
        from .sandbox_backend import MODELS, SandboxBackend

        models.update({m: SandboxBackend(m) for m in MODELS})
    if model_dir is not None:
        from .hf_streaming import StreamingHFBackend
        from .models import resolve_model_path, served_name

        path = resolve_model_path(model_dir)
        if path.startswith(("/", ".", "~")) and not Path(path).is_dir():
            raise UserError(f"MODEL_DIR: no such directory: {path}")
        served = name or served_name(model_dir, path)
        models[served] = StreamingHFBackend(str(path), template=template, dtype=dtype, device=device,  # type: ignore[arg-type]
                                   batch_size=batch_size)
    return models
