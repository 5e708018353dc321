"""`lionkd serve`'s app: any `Backend` behind an OpenAI-compatible HTTP API.

Routes: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`, with `n`, `stop`,
`seed`, logprobs in OpenAI's formats (chat: `logprobs.content[]`; completions: the legacy lists),
prompt scoring on completions (vLLM's `prompt_logprobs`, or `echo` with `logprobs`; `llm/scoring.py`),
`usage`, and server-sent events when `stream` is true. Errors use OpenAI's error body: 400 for a bad
body (an unknown message role; a prompt that with `max_tokens` does not fit the model's context, as
vLLM answers it, never cut to fit), 401 for a missing or wrong bearer key, 404 for an unknown model or
route, 405 for a wrong method.

Requests to one model are micro-batched (`batcher.py`). A streamed plain request (one sample, no
beams or logprobs) to a model folder is sent as it is generated (`StreamingHFBackend`); any other
streamed reply is generated first and then sent in token-sized pieces.
"""

from __future__ import annotations

import dataclasses
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..base import Backend, GenRequest, GenResult
from .batcher import MicroBatcher
from .replies import (
    chat_events,
    chat_logprobs,
    completion_events,
    legacy_logprobs,
    live_chat_events,
    live_completion_events,
    usage,
)
from .schemas import APIError, ChatBody, CompletionBody, parse_body

EVENT_STREAM = "text/event-stream"


def create_app(
    models: dict[str, Backend], api_key: str | None = None, *, max_batch: int | None = None,
    batch_wait_s: float = 0.005,
) -> FastAPI:
    """An OpenAI-compatible app serving each backend under its name in `models`."""
    routes = Routes(models, max_batch, batch_wait_s)
    app = FastAPI(title="lionkd", docs_url=None, redoc_url=None)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.middleware("http")(KeyCheck(api_key))
    app.add_api_route("/v1/models", routes.list_models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", routes.chat, methods=["POST"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    return app


async def api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """An unknown route or a wrong method: OpenAI's error body, like every other error here."""
    assert isinstance(exc, StarletteHTTPException)
    what = {404: f"unknown route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, what.get(exc.status_code, str(exc.detail)), code=code).response()


class KeyCheck:
    """The bearer key every request must carry, when the server has one."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key

    async def __call__(self, request: Request, call_next: Any) -> Any:
        if self.api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return APIError(401, "invalid or missing API key", code="invalid_api_key").response()
        return await call_next(request)


class Routes:
    """The three routes over the served models, each with its micro-batcher."""

    def __init__(self, models: dict[str, Backend], max_batch: int | None, batch_wait_s: float) -> None:
        self.models = models
        self.batchers = {
            name: MicroBatcher(b, max_batch or int(getattr(b, "batch_size", 16)), batch_wait_s)
            for name, b in models.items()
        }

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "lionkd"} for name in self.models
        ]}

    async def chat(self, request: Request) -> Any:
        body: ChatBody = await parse_body(request, ChatBody)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        pieces = self.live(body.model, body.request()) if body.stream else None
        if pieces is not None:
            return StreamingResponse(live_chat_events(head, pieces, body.include_usage), media_type=EVENT_STREAM)
        (result,) = await self.generate(body.model, [body.request()])
        if body.stream:
            return StreamingResponse(chat_events(head, result, body.include_usage), media_type=EVENT_STREAM)
        return head | {
            "object": "chat.completion",
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": c.text},
                 "logprobs": chat_logprobs(c.logprobs) if body.logprobs and c.logprobs is not None else None,
                 "finish_reason": c.finish_reason}
                for i, c in enumerate(result.choices)
            ],
            "usage": usage([result]),
        }

    async def completions(self, request: Request) -> Any:
        body: CompletionBody = await parse_body(request, CompletionBody)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.scores_prompt:
            return head | {"object": "text_completion", **await self.score(body)}
        if body.max_tokens == 0:
            raise APIError(400, "'max_tokens': 0 is allowed only with echo and logprobs (scoring a prompt)")
        requests = body.requests()
        pieces = self.live(body.model, requests[0]) if body.stream and len(requests) == 1 else None
        if pieces is not None:
            return StreamingResponse(live_completion_events(head, pieces, body.include_usage),
                                     media_type=EVENT_STREAM)
        results = await self.generate(body.model, requests)
        choices = [c for r in results for c in r.choices]
        if body.stream:
            return StreamingResponse(completion_events(head, choices, results, body.include_usage),
                                     media_type=EVENT_STREAM)
        return head | {
            "object": "text_completion",
            "choices": [
                {"index": i, "text": c.text, "finish_reason": c.finish_reason,
                 "logprobs": legacy_logprobs(c.logprobs) if body.logprobs is not None and c.logprobs else None}
                for i, c in enumerate(choices)
            ],
            "usage": usage(results),
        }

    async def score(self, body: CompletionBody) -> dict[str, Any]:
        """Choices and usage of a request for prompt scores (`llm/scoring.py`); 400 for a model that cannot."""
        from ..scoring import NotScorable, scored_completions

        self.batcher(body.model)  # 404 for an unknown model
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        vllm_form = body.prompt_logprobs is not None
        try:
            choices, used = await scored_completions(
                self.models[body.model], prompts, top_k=body.prompt_logprobs if vllm_form else body.logprobs or 0,
                vllm_form=vllm_form, echo=body.echo, with_ids=body.return_token_ids)
        except NotScorable as exc:
            raise APIError(400, str(exc), code="prompt_scoring_unsupported") from None
        return {"choices": choices, "usage": used}

    def batcher(self, model: str) -> MicroBatcher:
        if model not in self.batchers:
            raise APIError(404, f"the model '{model}' does not exist (served: {', '.join(self.models)})",
                           code="model_not_found")
        return self.batchers[model]

    async def generate(self, model: str, requests: list[GenRequest]) -> list[GenResult]:
        """The replies to `requests`, through the model's micro-batcher; any failure is a 500."""
        for req in requests:
            check_context(self.models.get(model), req)
        try:
            results = await self.batcher(model).submit(requests)
        except APIError:
            raise
        except Exception as exc:
            raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error") from None
        failed = next((r for r in results if not r.ok), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}", "server_error")
        return results

    def live(self, model: str, req: GenRequest) -> AsyncIterator[Any] | None:
        """The backend's live text stream for `req`, or None (then a reply is generated, then streamed)."""
        self.batcher(model)  # 404 for an unknown model
        stream_text = getattr(self.models[model], "stream_text", None)
        if stream_text is None or not (req.n == 1 and req.num_beams == 1 and req.logprobs is None):
            return None
        check_context(self.models[model], req)
        return stream_text(req)


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
