"""Judging pairs of answers: each (instruction, a, b) shown to the referee in both orders, to cancel its
position bias, with unreadable replies asked again.

Role-agnostic: Lion compares teacher with student, the judge evaluation candidate with reference.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..llm.base import GenRequest, GenResult
from .parse import parse_scores
from .prompt import REFEREE, pairwise_messages
from .verdict import UNPARSEABLE, PairVerdict


class RefereeCallError(RuntimeError):
    """A referee call failed after the backend's own retries (network, quota): the work is not done."""


def _request(prompt: str, instruction: str, first: str, second: str, params: dict[str, Any],
             attempt: int) -> GenRequest:
    params = dict(params)
    if attempt:
        # A re-ask must be a new call, not the cached failing one: a different, deterministic seed.
        params["seed"] = (params.get("seed") or 0) + attempt
    return GenRequest.chat(pairwise_messages(prompt, instruction, first, second), **params)


async def stream_judgements(
    llm: Any,
    items: Sequence[tuple[str, str, str]],
    *,
    prompt: str = REFEREE,
    params: dict[str, Any] | None = None,
    retries: int = 2,
    iteration: int | None = None,
) -> AsyncIterator[tuple[int, PairVerdict]]:
    """Yield (index, verdict) for each (instruction, a, b) as soon as both of its orders are settled.

    `llm` is a CachedLLM (or anything with its `stream(requests, iteration=)`). Every unreadable reply
    is asked again, up to `retries` times per order. A call that fails outright raises
    RefereeCallError after the other items are through, so that a rerun retries it.
    """
    params = params or {}
    verdicts = [PairVerdict() for _ in items]
    # (item index, order) pairs still to ask; order 0 shows a first, order 1 shows b first
    pending = [(i, order) for i in range(len(items)) for order in (0, 1)]
    open_orders = [2] * len(items)
    call_errors: list[str] = []
    for attempt in range(retries + 1):
        if not pending:
            break
        requests = []
        for i, order in pending:
            instruction, a, b = items[i]
            first, second = (a, b) if order == 0 else (b, a)
            requests.append(_request(prompt, instruction, first, second, params, attempt))
        retry: list[tuple[int, int]] = []
        async for k, result in llm.stream(requests, iteration=iteration):
            i, order = pending[k]
            settled = _settle(verdicts[i], order, result, attempt == retries, call_errors)
            if not settled:
                retry.append((i, order))
                continue
            open_orders[i] -= 1
            if open_orders[i] == 0 and not _has_call_error(verdicts[i]):
                yield i, verdicts[i]
        pending = sorted(retry)
    if call_errors:
        raise RefereeCallError(f"{len(call_errors)} referee call(s) failed, e.g. {call_errors[0]}")


_CALL_ERROR = "call failed: "


def _has_call_error(v: PairVerdict) -> bool:
    return v.error is not None and v.error.startswith(_CALL_ERROR)


def _settle(v: PairVerdict, order: int, result: GenResult, last: bool, call_errors: list[str]) -> bool:
    """Record one reply into the verdict; False when it should be asked again."""
    if not result.ok:  # the backend already retried; asking again with another seed would change the run
        v.error = _CALL_ERROR + str(result.error)
        call_errors.append(str(result.error))
        return True
    text = result.text
    if order == 0:
        v.raw_a_first = text
    else:
        v.raw_b_first = text
    scores = parse_scores(text)
    if scores is None:
        v.parse_failures += 1
        if last:
            v.error = v.error or UNPARSEABLE
            return True
        return False
    if order == 0:
        v.scores_a_first = scores
    else:
        v.scores_b_first = (scores[1], scores[0])  # b was Assistant 1: map back to (a, b)
    return True


async def judge_pairs(
    llm: Any,
    items: Sequence[tuple[str, str, str]],
    *,
    prompt: str = REFEREE,
    params: dict[str, Any] | None = None,
    retries: int = 2,
    iteration: int | None = None,
) -> list[PairVerdict]:
    """Judge every (instruction, a, b) in both orders; the verdicts in the order of `items`."""
    out: list[PairVerdict | None] = [None] * len(items)
    async for i, verdict in stream_judgements(llm, items, prompt=prompt, params=params, retries=retries,
                                              iteration=iteration):
        out[i] = verdict
    return out  # type: ignore[return-value]
