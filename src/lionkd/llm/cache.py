"""The call cache: no identical call is paid for twice, across iterations and restarts.

Every sample is its own cache entry, keyed by sha256 of (backend kind, model, request parameters
without `n`, sample index). A request for n samples maps to n keys; only the missing samples are
asked for (one request with `n` = the number missing) and each is stored the moment its reply
arrives, together with its tokens, role and iteration (the store's usage ledger). A request that
finally failed is recorded as a failure and not cached, so a rerun asks again.

Identical calls share keys even when they sample (temperature > 0) without a seed: asking the same
question twice returns the first answer. That is deliberate - it is what makes a crashed or repeated
run free - and a caller that wants fresh samples asks for more of them (a larger `n`) or varies the
seed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..errors import UserError
from ..records import stable_json
from ..store import Store
from .base import Backend, Choice, GenRequest, GenResult, choice_from_dict


def call_key(kind: str, model: str, request: GenRequest, sample: int) -> str:
    params = request.to_dict()
    del params["n"]
    return hashlib.sha256(stable_json([kind, model, params, sample]).encode("utf-8")).hexdigest()


@dataclasses.dataclass
class _Group:
    """Identical requests (up to `n`) in one batch: answered by one call."""

    request: GenRequest  # with the largest n asked for
    indices: list[int]
    keys: list[str]
    samples: dict[int, dict[str, Any]]  # sample index -> stored sample
    missing: list[int] = dataclasses.field(default_factory=list)


class CachedLLM:
    """A backend with the run store's call cache and usage ledger in front of it.

    `store=None` turns the cache off (every call is sent), which keeps callers uniform.
    """

    def __init__(self, backend: Backend, store: Store | None, *, role: str | None = None) -> None:
        self.backend = backend
        self.store = store
        self.role = role

    @property
    def model(self) -> str:
        return self.backend.model

    def keys(self, request: GenRequest) -> list[str]:
        return [call_key(self.backend.kind, self.backend.model, request, k) for k in range(request.n)]

    async def stream(
        self, requests: Sequence[GenRequest], *, iteration: int | None = None
    ) -> AsyncIterator[tuple[int, GenResult]]:
        """(index, result) for every request: cached ones first (`cached=True`), then as sent ones finish."""
        if self.store is None:
            async for item in self._backend_stream(requests):
                yield item
            return
        groups = self._groups(requests)
        found = self.store.get_calls([k for g in groups for k in g.keys])
        to_send: list[_Group] = []
        for g in groups:
            g.samples = {k: found[key] for k, key in enumerate(g.keys) if key in found}
            g.missing = [k for k in range(len(g.keys)) if k not in g.samples]
            if g.missing:
                to_send.append(g)
                continue
            for i in g.indices:
                yield i, _assemble(g.samples, requests[i].n, cached=True)
        asked = [dataclasses.replace(g.request, n=len(g.missing)) for g in to_send]
        async for j, result in self._budgeted_stream(asked):
            g = to_send[j]
            if result.ok:
                self._keep(g, asked[j], result, iteration)
                for i in g.indices:
                    yield i, _assemble(g.samples, requests[i].n, cached=False)
            else:
                self.store.put_failure(g.keys[g.missing[0]], backend=self.backend.kind, model=self.model,
                                       error=result.error or "unknown error", role=self.role, iteration=iteration)
                for i in g.indices:
                    yield i, dataclasses.replace(result, choices=[])

    async def agenerate(self, requests: Sequence[GenRequest], *, iteration: int | None = None) -> list[GenResult]:
        out: list[GenResult | None] = [None] * len(requests)
        async for i, result in self.stream(requests, iteration=iteration):
            out[i] = result
        return out  # type: ignore[return-value]

    def generate(self, requests: Sequence[GenRequest], *, iteration: int | None = None) -> list[GenResult]:
        return asyncio.run(self.agenerate(requests, iteration=iteration))

    async def aclose(self) -> None:
        await self.backend.aclose()

    # ------------------------------------------------------------------
    def _groups(self, requests: Sequence[GenRequest]) -> list[_Group]:
        by_params: dict[GenRequest, _Group] = {}
        for i, req in enumerate(requests):
            base = dataclasses.replace(req, n=1)
            g = by_params.get(base)
            if g is None:
                by_params[base] = _Group(req, [i], self.keys(req), {})
            else:
                g.indices.append(i)
                if req.n > g.request.n:
                    g.request, g.keys = req, self.keys(req)
        return list(by_params.values())

    def _keep(self, g: _Group, asked: GenRequest, result: GenResult, iteration: int | None) -> None:
        """Store each returned sample under its own key; the prompt is charged once per call."""
        count = len(result.choices)
        share, extra = divmod(result.completion_tokens, count) if count else (0, 0)
        request = asked.to_dict()
        del request["n"]
        for j, (k, choice) in enumerate(zip(g.missing, result.choices, strict=False)):
            completion = share + (extra if j == 0 else 0)
            sample = {"choice": dataclasses.asdict(choice), "prompt_tokens": result.prompt_tokens,
                      "completion_tokens": completion}
            self.store.put_call(  # type: ignore[union-attr]
                g.keys[k], backend=self.backend.kind, model=self.model, request=request | {"sample": k},
                result=sample, prompt_tokens=result.prompt_tokens if j == 0 else 0,
                completion_tokens=completion, role=self.role, iteration=iteration,
            )
            g.samples[k] = sample

    async def _budgeted_stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        """Send `requests` within the run's budget (see `lionkd.budget`): as many as fit at their worst
        case go out together; when they are through, their actual cost frees room for the next ones; when
        not one more fits and nothing is in flight, BudgetExceeded stops the stage (what came back is stored)."""
        budget = getattr(self.store, "budget", None)
        if budget is None or not budget.applies(self.role):
            async for item in self._backend_stream(requests):
                yield item
            return
        role: str = self.role  # type: ignore[assignment]
        pending = list(range(len(requests)))
        while pending:
            admitted = budget.admit(role, [requests[j] for j in pending])
            while not admitted and budget.in_flight():  # other calls of this run may leave room when they end
                await asyncio.sleep(0.05)
                admitted = budget.admit(role, [requests[j] for j in pending])
            if not admitted:
                raise budget.exceeded(role, [requests[j] for j in pending])
            batch, pending = pending[:len(admitted)], pending[len(admitted):]
            open_ = dict(enumerate(admitted))
            try:
                async for b, result in self._backend_stream([requests[j] for j in batch]):
                    spent = (budget.actual(role, len(result.choices), result.prompt_tokens, result.completion_tokens)
                             if result.ok else budget.actual(role, 1, 0, 0))
                    budget.settle(role, open_.pop(b), spent)
                    yield batch[b], result
            finally:
                for reserved in open_.values():  # stopped early (an error, Ctrl-C): nothing came back for these
                    budget.settle(role, reserved, None)

    async def _backend_stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        if not requests:
            return
        try:
            async for item in self.backend.stream(requests):
                yield item
        except UserError as exc:
            if self.role is None:
                raise
            raise UserError(f"{self.role}: {exc}") from None


def _assemble(samples: dict[int, dict[str, Any]], n: int, *, cached: bool) -> GenResult:
    chosen = [samples[k] for k in range(n) if k in samples]
    choices: list[Choice] = [choice_from_dict(s["choice"]) for s in chosen]
    return GenResult(
        choices=choices,
        prompt_tokens=chosen[0]["prompt_tokens"] if chosen else 0,
        completion_tokens=sum(s["completion_tokens"] for s in chosen),
        cached=cached,
    )
