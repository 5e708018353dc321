"""Any OpenAI-compatible endpoint (OpenAI, vLLM, TGI, SGLang, `lionkd serve`) through the official SDK.

Many requests are in flight at once (bounded by `concurrency`), optional requests/min and tokens/min
limits pace them, and results come back in order of completion. Retries are ours, not the SDK's
(the client has `max_retries=0`), so every retry is counted in `stats` and logged: 429, 5xx,
timeouts, connection errors and malformed bodies are retried with exponential backoff and jitter,
honouring `Retry-After`; 400/401/403/404 are not. A request that still fails ends as a `GenResult`
whose `error` names the reason. Until the endpoint has answered once, a batch starts with a single
request, so a wrong key or model name costs one call and raises one `UserError` instead of a volley.

A 429 with `Retry-After` is waited out as asked, for up to the role's `timeout_s` per request, without
spending an attempt: a rate limit is not a failure.

Failing fast: before its first batch, the backend asks the endpoint for its model list (free, and
through the same client), so a refused connection, an unknown host, a TLS failure or a rejected key
is one `UserError` within seconds rather than every request retried for minutes; so is an endpoint
whose first `SAME_FAILURE_STOP` attempts fail the same way (HTTP 5xx, a body that is not a completion)
before it ever answered. During a batch,
once most finished requests have failed the same way (`BREAKER_MIN` or more), the batch stops with
one `UserError` that counts them.

The API key is held only in memory and scrubbed from every message this module produces.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion

from ..errors import UserError
from .base import Backend, Choice, GenRequest, GenResult, TokenLogprob
from .ratelimit import TokenBucket

if TYPE_CHECKING:
    from ..config import EndpointConfig

log = logging.getLogger(__name__)

NO_KEY = "no-key"  # local servers need no key; a placeholder keeps the SDK from reading OPENAI_API_KEY
MAX_RETRY_AFTER_S = 120.0
RETRYABLE_STATUS = frozenset({408, 409, 429})
# The reachability probe: a few quick tries (a server that is just starting gets a moment), each
# with a short timeout, so a dead endpoint is known within seconds.
PROBE_ATTEMPTS = 3
PROBE_TIMEOUT_S = 5.0
PROBE_BACKOFF_S = 0.5
# A batch stops once at least this many requests failed the same way and they are most of those done.
BREAKER_MIN = 8
# An endpoint that never answered stops after this many attempts in a row that failed the same way.
SAME_FAILURE_STOP = 3


class MalformedResponse(Exception):
    """The endpoint answered 200 with a body that is not a completion."""


class _Rejected(Exception):
    """A 401/404, or the same failure on every first attempt, before the endpoint has ever answered: the
    whole batch is pointless."""


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
        self._failing_alike: Counter[str] = Counter()  # failed attempts in a row, before the first answer
        self._reachable = False  # the probe (or a request) has reached the endpoint
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._slots: asyncio.Semaphore | None = None
        self._streams = 0  # batches in progress; the client is closed when the last one ends

    @classmethod
    def from_endpoint(cls, endpoint: EndpointConfig, **overrides: Any) -> OpenAIBackend:
        """The endpoint's API; its key is read from the environment now and kept in memory only."""
        key = endpoint.api_key()
        if key is None and endpoint.base_url is None and endpoint.api_key_env:
            raise UserError(f"api_key_env: the environment variable ${endpoint.api_key_env} is not set "
                            "(needed for the OpenAI API; set base_url for a local server)")
        options: dict[str, Any] = {
            "base_url": endpoint.base_url, "api_key": key, "concurrency": endpoint.concurrency,
            "requests_per_minute": endpoint.requests_per_minute, "tokens_per_minute": endpoint.tokens_per_minute,
            "max_retries": endpoint.max_retries, "timeout_s": endpoint.timeout_s,
        }
        return cls(endpoint.model, **(options | overrides))

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
        if not self._reachable and not self._verified:
            await self.probe()
        breaker = _Breaker(self.where)
        start = 0
        if not self._verified:
            result, kind = await self._call_or_reject(requests[0])
            breaker.count(result, kind)
            yield 0, result
            start = 1
        done: asyncio.Queue[tuple[int, GenResult, str | None] | BaseException] = asyncio.Queue()
        todo = iter(range(start, len(requests)))

        async def worker() -> None:
            try:
                for i in todo:  # one shared iterator: each index is taken by exactly one worker
                    await done.put((i, *await self._call_or_reject(requests[i])))
            except Exception as exc:  # hand it to the consumer rather than hang it
                await done.put(exc)

        workers = [asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(requests) - start))]
        try:
            for _ in range(start, len(requests)):
                item = await done.get()
                if isinstance(item, BaseException):
                    raise item
                i, result, kind = item
                breaker.count(result, kind)  # raises once most requests fail alike
                yield i, result
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def probe(self) -> None:
        """Reach the endpoint once (GET /models) or raise one UserError saying why it cannot be reached.

        Any HTTP answer but 401 proves the endpoint is there (a server without /models answers 404);
        a 401 means the key was refused. Only a failure to connect, or no answer at all, stops here.
        """
        self._bind_loop()
        assert self._client is not None
        client = self._client.with_options(timeout=min(self.timeout_s, PROBE_TIMEOUT_S), max_retries=0)
        reason = "no answer"
        for attempt in range(PROBE_ATTEMPTS):
            try:
                await client.models.list()
            except openai.APIStatusError as exc:
                if exc.status_code == 401:
                    raise UserError(f"{self.where}: the API rejected the key (401); check the environment "
                                    "variable named by api_key_env") from None
                break
            except openai.APITimeoutError:
                reason = f"no answer within {min(self.timeout_s, PROBE_TIMEOUT_S):g} s"
            except openai.APIConnectionError as exc:
                reason = self._scrub(_connection_reason(exc))
            except (openai.APIResponseValidationError, ValueError, TypeError):
                break  # it answered, if oddly: the requests themselves will tell
            else:
                break
            if attempt + 1 < PROBE_ATTEMPTS:
                await asyncio.sleep(PROBE_BACKOFF_S * 2**attempt)
        else:
            raise UserError(f"{self.where}: cannot reach the endpoint ({reason}, {PROBE_ATTEMPTS} tries); "
                            "check base_url and that the server is running")
        self._reachable = True

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
    async def _call_or_reject(self, req: GenRequest) -> tuple[GenResult, str | None]:
        try:
            return await self._call(req)
        except _Rejected as exc:
            raise UserError(str(exc)) from None

    async def call(self, req: GenRequest) -> GenResult:
        """Send one request, retrying what is worth retrying; never raises for a failed request."""
        return (await self._call_or_reject(req))[0]

    async def _call(self, req: GenRequest) -> tuple[GenResult, str | None]:
        """The result, and the kind of failure when it failed ("connection", "HTTP 503", ...)."""
        self._bind_loop()
        assert self._slots is not None
        reason, kind = "not sent", "none"
        attempt, rate_limited_s = 0, 0.0
        while True:
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
                        return self._give_up(req, reason, attempt, fatal_status=status), kind
                    retry_after = _retry_after(exc.response.headers)
                except openai.APITimeoutError:
                    kind, reason = "timeout", f"timeout after {self.timeout_s:g} s"
                except openai.APIConnectionError as exc:
                    kind, reason = "connection", f"connection error: {self._scrub(str(exc.__cause__ or exc))}"
                except (openai.APIResponseValidationError, MalformedResponse) as exc:
                    kind, reason = "malformed", f"malformed response: {self._scrub(str(exc))[:200]}"
                else:
                    self._verified = self._reachable = True
                    self.stats["ok"] += 1
                    if self.token_bucket:
                        self.token_bucket.correct(result.prompt_tokens + result.completion_tokens - estimate)
                    self._failing_alike.clear()
                    return result, None
            if kind == "HTTP 429" and retry_after is not None and rate_limited_s + retry_after <= self.timeout_s:
                # A rate limit that says when to come back is waited out (within the role's timeout), not a
                # failure: it costs no attempt.
                rate_limited_s += retry_after
                self.stats["rate_limited"] += 1
                log.info("%s: rate limited; waiting %.2f s as asked", self.where, retry_after)
                await asyncio.sleep(retry_after)
                continue
            self._fail_fast_if_never_answered(kind, reason)
            if attempt == self.max_retries:
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            self.stats["retries"] += 1
            self.stats[f"retry:{kind}"] += 1
            log.info("%s: %s; retry %d/%d in %.2f s", self.where, reason, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
            attempt += 1
        return self._give_up(req, reason, self.max_retries), kind

    def _fail_fast_if_never_answered(self, kind: str, reason: str) -> None:
        """An endpoint that has never answered, and whose first attempts all fail the same way (a 500 on
        every request, an HTML page with status 200), will not start working by being asked more: stop in
        seconds with one line instead of retrying request after request for minutes."""
        if self._verified or not (kind == "malformed" or kind.startswith("HTTP 5")):
            self._failing_alike.clear()
            return
        if set(self._failing_alike) - {kind}:
            self._failing_alike.clear()
        self._failing_alike[kind] += 1
        if self._failing_alike[kind] >= SAME_FAILURE_STOP:
            raise _Rejected(f"{self.where}: the first {SAME_FAILURE_STOP} attempts all failed the same way "
                            f"({reason}); stopped - check base_url (an OpenAI-compatible API?) and the server")

    def _give_up(self, req: GenRequest, reason: str, attempt: int, fatal_status: int | None = None) -> GenResult:
        if fatal_status in (401, 404) and not self._verified:
            what = "the API rejected the key (401)" if fatal_status == 401 else f"not found (404): {reason}"
            hint = "; check the environment variable named by api_key_env" if fatal_status == 401 else (
                "; check the model name and base_url")
            raise _Rejected(f"{self.where}: {what}{hint}")
        self.stats["failed"] += 1
        tries = attempt + 1
        error = f"{reason} (after {tries} attempt{'s' if tries > 1 else ''})"
        # Counted in the failures table and by the breaker; one line per request would drown the terminal.
        log.info("%s: request failed: %s", self.where, error)
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


class _Breaker:
    """Stops a batch once most of its finished requests have failed the same way."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.finished = 0
        self.failed: Counter[str] = Counter()
        self.example: dict[str, str] = {}

    def count(self, result: GenResult, kind: str | None) -> None:
        self.finished += 1
        if result.ok or kind is None:
            return
        self.failed[kind] += 1
        self.example.setdefault(kind, result.error or kind)
        n = self.failed[kind]
        if n >= BREAKER_MIN and 2 * n > self.finished:
            raise UserError(f"{self.where}: {n} of {self.finished} requests failed ({self.example[kind]}); "
                            "stopped - finished work is saved, run the same command again when the endpoint "
                            "works")


def _connection_reason(exc: openai.APIConnectionError) -> str:
    """The innermost cause of a connection failure: "Connection refused", "Name or service not known"..."""
    cause: BaseException = exc
    for _ in range(10):  # a chain is short; the bound only guards against a cycle
        inner = cause.__cause__ or cause.__context__
        if inner is None:
            break
        cause = inner
    text = str(cause) or type(cause).__name__
    if isinstance(cause, OSError) and cause.errno:  # "Connection refused" rather than "[Errno 111] Connect call..."
        text = os.strerror(cause.errno) if cause.errno > 0 else (cause.strerror or text)
    return text if len(text) <= 200 else text[:200] + "..."


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
