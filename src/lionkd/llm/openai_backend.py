"""Any OpenAI-compatible endpoint (OpenAI, vLLM, TGI, SGLang, `lionkd serve`) through the official SDK.

Many requests are in flight at once (bounded by `concurrency`), optional requests/min and tokens/min
limits pace them, and results come back in order of completion. Retries are ours, not the SDK's
(the client has `max_retries=0`), so every retry is counted in `stats` and logged: 429, 5xx,
timeouts, connection errors and malformed bodies are retried with exponential backoff and jitter,
honouring `Retry-After`; 400/401/403/404 are not. A request that still fails ends as a `GenResult`
whose `error` names the reason. Until the endpoint has answered once, a batch starts with a single
request, so a wrong key or model name costs one call and raises one `UserError` instead of a volley.

The API key is held only in memory and scrubbed from every message this module produces.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion

from ..errors import UserError
from .base import Backend, Choice, GenRequest, GenResult, TokenLogprob
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

NO_KEY = "no-key"  # local servers need no key; a placeholder keeps the SDK from reading OPENAI_API_KEY
MAX_RETRY_AFTER_S = 120.0
RETRYABLE_STATUS = frozenset({408, 409, 429})


class MalformedResponse(Exception):
    """The endpoint answered 200 with a body that is not a completion."""


class _Rejected(Exception):
    """A 401/404 before the endpoint has ever answered: the whole batch is pointless."""


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 16,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_retries: int = 6,
        timeout_s: float = 120.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        super().__init__(model)
        self.base_url = base_url
        self._api_key = api_key or None
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.request_bucket = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.token_bucket = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self.stats: Counter[str] = Counter()  # attempts, ok, failed, retries, retry:<reason>
        self._verified = False  # the endpoint has accepted our key and model at least once
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._slots: asyncio.Semaphore | None = None
        self._streams = 0  # batches in progress; the client is closed when the last one ends

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r})"

    @property
    def where(self) -> str:
        host = urlsplit(self.base_url).netloc if self.base_url else "api.openai.com"
        return f"model '{self.model}' at {host}"

    # ------------------------------------------------------------------ the batch
    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        if not requests:
            return
        self._bind_loop()
        self._streams += 1
        try:
            async for item in self._fan_out(requests):
                yield item
        finally:
            self._streams -= 1
            if self._streams == 0:  # callers often end the event loop next; leave no connection behind
                await self.aclose()

    async def _fan_out(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        start = 0
        if not self._verified:
            yield 0, await self._call_or_reject(requests[0])
            start = 1
        done: asyncio.Queue[tuple[int, GenResult] | BaseException] = asyncio.Queue()
        todo = iter(range(start, len(requests)))

        async def worker() -> None:
            try:
                for i in todo:  # one shared iterator: each index is taken by exactly one worker
                    await done.put((i, await self._call_or_reject(requests[i])))
            except Exception as exc:  # hand it to the consumer rather than hang it
                await done.put(exc)

        workers = [asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(requests) - start))]
        try:
            for _ in range(start, len(requests)):
                item = await done.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.close()
        self._client, self._loop = None, None

    def _bind_loop(self) -> None:
        """An HTTP client belongs to one event loop; `generate()` makes a new loop each call."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client is None:
            self._loop = loop
            self._client = openai.AsyncOpenAI(
                api_key=self._api_key or NO_KEY, base_url=self.base_url, max_retries=0, timeout=self.timeout_s
            )
            self._slots = asyncio.Semaphore(self.concurrency)

    # ------------------------------------------------------------------ one request, with retries
    async def _call_or_reject(self, req: GenRequest) -> GenResult:
        try:
            return await self.call(req)
        except _Rejected as exc:
            raise UserError(str(exc)) from None

    async def call(self, req: GenRequest) -> GenResult:
        """Send one request, retrying what is worth retrying; never raises for a failed request."""
        self._bind_loop()
        assert self._slots is not None
        reason, kind = "not sent", "none"
        for attempt in range(self.max_retries + 1):
            estimate = _estimate_tokens(req)
            if self.request_bucket:
                await self.request_bucket.acquire(1)
            if self.token_bucket:
                await self.token_bucket.acquire(estimate)
            retry_after: float | None = None
            async with self._slots:
                self.stats["attempts"] += 1
                try:
                    result = await self._send(req)
                except openai.APIStatusError as exc:
                    status = exc.status_code
                    kind = f"HTTP {status}"
                    reason = f"{kind}: {self._scrub(_status_message(exc))}"
                    if status not in RETRYABLE_STATUS and status < 500:
                        return self._give_up(req, reason, attempt, fatal_status=status)
                    retry_after = _retry_after(exc.response.headers)
                except openai.APITimeoutError:
                    kind, reason = "timeout", f"timeout after {self.timeout_s:g} s"
                except openai.APIConnectionError as exc:
                    kind, reason = "connection", f"connection error: {self._scrub(str(exc.__cause__ or exc))}"
                except (openai.APIResponseValidationError, MalformedResponse) as exc:
                    kind, reason = "malformed", f"malformed response: {self._scrub(str(exc))[:200]}"
                else:
                    self._verified = True
                    self.stats["ok"] += 1
                    if self.token_bucket:
                        self.token_bucket.correct(result.prompt_tokens + result.completion_tokens - estimate)
                    return result
            if attempt == self.max_retries:
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            self.stats["retries"] += 1
            self.stats[f"retry:{kind}"] += 1
            log.info("%s: %s; retry %d/%d in %.2f s", self.where, reason, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
        return self._give_up(req, reason, self.max_retries)

    def _give_up(self, req: GenRequest, reason: str, attempt: int, fatal_status: int | None = None) -> GenResult:
        if fatal_status in (401, 404) and not self._verified:
            what = "the API rejected the key (401)" if fatal_status == 401 else f"not found (404): {reason}"
            hint = "; check the environment variable named by api_key_env" if fatal_status == 401 else (
                "; check the model name and base_url")
            raise _Rejected(f"{self.where}: {what}{hint}")
        self.stats["failed"] += 1
        tries = attempt + 1
        error = f"{reason} (after {tries} attempt{'s' if tries > 1 else ''})"
        log.warning("%s: request failed: %s", self.where, error)
        return GenResult(error=error)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)  # jitter spreads out clients that failed together

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    # ------------------------------------------------------------------ the wire format
    async def _send(self, req: GenRequest) -> GenResult:
        assert self._client is not None
        params: dict[str, Any] = {
            "model": self.model, "temperature": req.temperature, "top_p": req.top_p,
            "max_tokens": req.max_tokens, "n": req.n,
        }
        if req.stop:
            params["stop"] = list(req.stop)
        if req.seed is not None:
            params["seed"] = req.seed
        # `client.post` is the SDK's documented route for plain-dict bodies: the same errors, timeouts and
        # response types as `chat.completions.create`, without its TypedDict transform of every
        # parameter, which costs more client CPU than the rest of a request together.
        try:
            if req.messages is not None:
                if req.logprobs is not None:
                    params["logprobs"] = True
                    if req.logprobs > 0:
                        params["top_logprobs"] = req.logprobs
                params["messages"] = req.message_dicts()
                return parse_chat(await self._client.post("/chat/completions", body=params, cast_to=ChatCompletion))
            if req.logprobs is not None:
                params["logprobs"] = req.logprobs
            params["prompt"] = req.prompt
            return parse_completion(await self._client.post("/completions", body=params, cast_to=Completion))
        except (AttributeError, TypeError, ValueError, KeyError) as exc:  # a body that is not a completion
            raise MalformedResponse(f"{type(exc).__name__}: {exc}") from exc


def parse_chat(resp: Any) -> GenResult:
    choices = _choices(resp)
    out = []
    for c in choices:
        content = getattr(c.logprobs, "content", None) if c.logprobs is not None else None
        logprobs = None
        if content is not None:
            logprobs = [
                TokenLogprob(t.token, float(t.logprob), [(a.token, float(a.logprob)) for a in t.top_logprobs or []])
                for t in content
            ]
        if not isinstance(c.message.content, (str, type(None))):
            raise MalformedResponse("message content is not text")
        out.append(Choice(c.message.content or "", c.finish_reason or "stop", logprobs))
    return _with_usage(resp, out)


def parse_completion(resp: Any) -> GenResult:
    out = []
    for c in _choices(resp):
        logprobs = None
        lp = c.logprobs
        if lp is not None and lp.tokens is not None:
            tops = lp.top_logprobs or [None] * len(lp.tokens)
            logprobs = [
                TokenLogprob(tok, float(val), sorted(((k, float(v)) for k, v in (top or {}).items()),
                                                     key=lambda kv: -kv[1]))
                for tok, val, top in zip(lp.tokens, lp.token_logprobs, tops, strict=False)
            ]
        if not isinstance(c.text, str):
            raise MalformedResponse("choice text is not text")
        out.append(Choice(c.text, c.finish_reason or "stop", logprobs))
    return _with_usage(resp, out)


def _choices(resp: Any) -> list[Any]:
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse(f"no choices in the response body ({type(resp).__name__})")
    return sorted(choices, key=lambda c: c.index or 0)


def _with_usage(resp: Any, choices: list[Choice]) -> GenResult:
    usage = getattr(resp, "usage", None)
    return GenResult(
        choices=choices,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
    )


def _status_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:300]
    return exc.response.reason_phrase or exc.message[:300]


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, `retry-after` seconds or HTTP date)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            when = email.utils.parsedate_tz(value)
            if when is None:
                continue
            seconds = email.utils.mktime_tz(when) - time.time()
        return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
    return None


def _estimate_tokens(req: GenRequest) -> float:
    """A pessimistic guess for the tokens/min bucket, corrected once usage comes back."""
    chars = len(req.prompt or "") + sum(len(c) for _, c in req.messages or ())
    return chars / 4 + req.max_tokens * req.n
