"""The referee: read its scores, and judge pairs of answers in both orders.

`parse_scores` reads the two 1-10 scores out of a free-text reply ("Assistant 1: 8", "**Assistant
1:** 8/10", "8 7", ...) and returns None when it cannot tell them reliably (a missing or conflicting
score, a score out of 10 that is out of range, a range like "7-8"). A reply it cannot read is asked
again with a different seed; a pair still unreadable after the retries is reported with an error and
must be left out by the caller, never scored.

`judge_pairs` is role-agnostic: it compares answer a with answer b (Lion: teacher vs student; judge
evaluation: candidate vs reference), showing a first and then b first to cancel position bias.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..llm.base import GenRequest, GenResult
from ..records import same_preference
from .prompts import REFEREE

MAX_SCORE = 10.0

_NUMBER = r"(?<![\d.])(?P<num>\d+(?:\.\d+)?)"
# How a labelled score may be written between the label and the number: punctuation, markdown and a
# few connecting words ("Assistant 1 receives a score of 8", "**Assistant 1:** 8/10").
_GAP_WORDS = r"score|scores|rating|rated|scored|gets|receives|earns|deserves|is|a|of|given|overall|final|total|s"
_LABELLED = re.compile(
    r"assistant\s*#?\s*(?P<who>[12])(?!\d)"
    rf"(?P<gap>(?:[^\w\n]|_|\n|\b(?:{_GAP_WORDS})\b){{0,40}}?)"
    rf"{_NUMBER}"
    r"(?P<tail>\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?)|\s*[-–]\s*\d)?",
    re.IGNORECASE,
)
_BARE = r"\**(?P<{n}>\d+(?:\.\d+)?)\**(?:\s*/\s*10(?:\.0+)?)?"
_TWO_BARE = re.compile(rf"^[^\w*]*(?:{_BARE.format(n='a')})\s*(?:[,;]\s*|\s+)(?:{_BARE.format(n='b')})[\s.]*$")
_ONE_BARE = re.compile(rf"^[^\w*]*(?:{_BARE.format(n='a')})[\s.]*$")
_WORDS = re.compile(r"[^\W\d_]+")


def parse_scores(text: str) -> tuple[float, float] | None:
    """The scores of Assistant 1 and Assistant 2 in a referee reply, or None when unreadable."""
    if not text or not text.strip():
        return None
    labelled = _labelled_scores(text)
    if labelled is not None:
        return labelled if labelled != () else None
    return _bare_scores(text)


def _labelled_scores(text: str) -> tuple[float, float] | tuple[()] | None:
    """Scores from "Assistant N ... <score>" lines; () when they exist but are unreliable; None when absent."""
    found: dict[str, list[float]] = {"1": [], "2": []}
    bad = False
    last_end = 0
    for m in _LABELLED.finditer(text):
        if "\n\n" in m.group("gap") or not _near_line_start(text, m.start(), last_end):
            continue
        last_end = m.end()
        value = _checked(m.group("num"), m.group("tail"), m.group("den"))
        if value is None or m.group("gap").endswith(("-", "−")):  # out of range, or negative
            bad = True
        else:
            found[m.group("who")].append(value)
    if not found["1"] and not found["2"] and not bad:
        return None
    if bad or not found["1"] or not found["2"]:
        return ()
    if len(set(found["1"])) > 1 or len(set(found["2"])) > 1:
        return ()  # the reply contradicts itself
    return found["1"][0], found["2"][0]


def _near_line_start(text: str, start: int, last_end: int) -> bool:
    """A score label leads its line: at most a few words before it (markdown, "Score of the", "Scores:"),
    counting from the line start or from the previous score on the same line."""
    line_begin = text.rfind("\n", 0, start) + 1
    begin = max(line_begin, last_end)
    return len(_WORDS.findall(text[begin:start])) <= 4


def _checked(num: str, tail: str | None, den: str | None) -> float | None:
    value = float(num)
    if tail and den is None:
        return None  # a range such as "7-8"
    if den is not None and float(den) != MAX_SCORE:
        return None  # out of another scale
    return value if 0.0 <= value <= MAX_SCORE else None


def _bare_scores(text: str) -> tuple[float, float] | None:
    """"8 7" or "8, 7" on the first line, or one bare score on each of the first two lines."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    m = _TWO_BARE.match(lines[0])
    if m:
        pair = (_checked(m.group("a"), None, None), _checked(m.group("b"), None, None))
    else:
        first = _ONE_BARE.match(lines[0])
        second = _ONE_BARE.match(lines[1]) if len(lines) > 1 else None
        if not (first and second):
            return None
        pair = (_checked(first.group("a"), None, None), _checked(second.group("a"), None, None))
    if pair[0] is None or pair[1] is None:
        return None
    return pair[0], pair[1]


# --------------------------------------------------------------------------- judging pairs


@dataclass
class PairVerdict:
    """The referee on one (instruction, a, b): raw replies and scores mapped back to (a, b) per order."""

    raw_a_first: str | None = None
    raw_b_first: str | None = None
    scores_a_first: tuple[float, float] | None = None  # (a, b) when a was shown as Assistant 1
    scores_b_first: tuple[float, float] | None = None  # (a, b) when b was shown as Assistant 1
    parse_failures: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.scores_a_first is not None and self.scores_b_first is not None

    @property
    def a_score(self) -> float:
        assert self.scores_a_first and self.scores_b_first
        return (self.scores_a_first[0] + self.scores_b_first[0]) / 2

    @property
    def b_score(self) -> float:
        assert self.scores_a_first and self.scores_b_first
        return (self.scores_a_first[1] + self.scores_b_first[1]) / 2

    @property
    def orders_agree(self) -> bool:
        """Both orders prefer the same answer, or both call it a tie."""
        assert self.scores_a_first and self.scores_b_first
        return same_preference(self.scores_a_first, self.scores_b_first)

    @property
    def first_position_advantage(self) -> float:
        """How much more Assistant 1 got than Assistant 2, averaged over the two orders (0 = no bias)."""
        assert self.scores_a_first and self.scores_b_first
        a1 = self.scores_a_first[0] - self.scores_a_first[1]
        b1 = self.scores_b_first[1] - self.scores_b_first[0]
        return (a1 + b1) / 2


class RefereeCallError(RuntimeError):
    """A referee call failed after the backend's own retries (network, quota): the work is not done."""


def _request(prompt: str, instruction: str, first: str, second: str, params: dict[str, Any],
             attempt: int) -> GenRequest:
    text = prompt.format(instruction=instruction, answer_1=first, answer_2=second)
    params = dict(params)
    if attempt:
        # A re-ask must be a new call, not the cached failing one: a different, deterministic seed.
        params["seed"] = (params.get("seed") or 0) + attempt
    return GenRequest.chat([{"role": "user", "content": text}], **params)


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
            v.error = v.error or "unparseable referee reply"
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


@dataclass
class JudgeSummary:
    judged: int
    excluded: int  # unreadable after retries: left out, never scored
    parse_failures: int  # unreadable replies, including those a retry fixed
    order_agreement: float | None  # share of judged items whose two orders prefer the same answer
    first_position_advantage: float | None  # mean score bonus for being shown first
    mean_a: float | None
    mean_b: float | None


def summarise(verdicts: Sequence[PairVerdict]) -> JudgeSummary:
    ok = [v for v in verdicts if v.ok]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return JudgeSummary(
        judged=len(ok),
        excluded=len(verdicts) - len(ok),
        parse_failures=sum(v.parse_failures for v in verdicts),
        order_agreement=mean([float(v.orders_agree) for v in ok]),
        first_position_advantage=mean([v.first_position_advantage for v in ok]),
        mean_a=mean([v.a_score for v in ok]),
        mean_b=mean([v.b_score for v in ok]),
    )
