"""Judge evaluation as in the Lion paper: a referee scores a candidate's answer and a reference answer
(e.g. the teacher's) to each question, in both orders, and the candidate's quality is the sum of its
scores over the sum of the reference's, in %, overall and per category.

The referee is the one Lion uses (`lionkd.referee`): the same prompt, the same tolerant parsing
and retries; this module turns its verdicts into the evaluation's scores. A question whose replies stay unreadable is left out and counted, never scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..referee import REFEREE, UNPARSEABLE, PairVerdict, stream_judgements, summarise


@dataclass
class JudgeItem:
    question: str
    candidate: str
    reference: str
    category: str | None = None


@dataclass
class JudgeScores:
    """The referee's verdicts on a set of questions (scores 1-10; candidate vs reference)."""

    questions: int
    judged: int  # both orders readable: these are scored
    unparseable: int  # left out because a reply stayed unreadable after the retries
    parse_failures: int  # unreadable replies, including those a retry fixed
    relative_score: float | None  # 100 * sum(candidate) / sum(reference) over judged questions
    candidate_total: float
    reference_total: float
    candidate_mean: float | None
    reference_mean: float | None
    wins: int  # candidate scored higher (mean of both orders)
    ties: int
    losses: int
    order_agreement: float | None  # share of judged questions whose two orders prefer the same answer
    first_position_advantage: float | None  # mean score bonus of being shown first
    per_category: dict[str, JudgeScores] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_verdicts(items: Sequence[JudgeItem], verdicts: Sequence[PairVerdict], by_category: bool = True
                   ) -> JudgeScores:
    """Sum the verdicts (a = candidate, b = reference) into relative scores."""
    stats = summarise(verdicts)
    ok = [v for v in verdicts if v.ok]
    candidate_total = sum(v.a_score for v in ok)
    reference_total = sum(v.b_score for v in ok)
    scores = JudgeScores(
        questions=len(verdicts),
        judged=len(ok),
        unparseable=sum(1 for v in verdicts if v.error == UNPARSEABLE),
        parse_failures=stats.parse_failures,
        relative_score=100 * candidate_total / reference_total if reference_total else None,
        candidate_total=candidate_total,
        reference_total=reference_total,
        candidate_mean=stats.mean_a,
        reference_mean=stats.mean_b,
        wins=sum(v.a_score > v.b_score for v in ok),
        ties=sum(v.a_score == v.b_score for v in ok),
        losses=sum(v.a_score < v.b_score for v in ok),
        order_agreement=stats.order_agreement,
        first_position_advantage=stats.first_position_advantage,
    )
    categories = sorted({it.category for it in items if it.category is not None})
    if by_category and categories:
        for category in categories:
            chosen = [i for i, it in enumerate(items) if it.category == category]
            scores.per_category[category] = score_verdicts(
                [items[i] for i in chosen], [verdicts[i] for i in chosen], by_category=False
            )
    return scores


async def judge_answers(
    referee: Any,
    items: Sequence[JudgeItem],
    *,
    prompt: str = REFEREE,
    params: dict[str, Any] | None = None,
    retries: int = 2,
    on_verdict: Callable[[int, PairVerdict], None] | None = None,
) -> tuple[JudgeScores, list[PairVerdict]]:
    """Judge every item in both orders through `referee` (a CachedLLM) and score the candidate.

    `on_verdict(index, verdict)` sees each verdict as it is settled (to save or show progress). A
    referee call that fails outright raises `lionkd.referee.RefereeCallError` once the others are
    through; the finished calls are in the cache, so running again only repeats the failed ones.
    """
    triples = [(it.question, it.candidate, it.reference) for it in items]
    verdicts: list[PairVerdict | None] = [None] * len(items)
    async for i, verdict in stream_judgements(referee, triples, prompt=prompt, params=params, retries=retries):
        verdicts[i] = verdict
        if on_verdict is not None:
            on_verdict(i, verdict)
    settled = [v if v is not None else PairVerdict(error="not judged") for v in verdicts]
    return score_verdicts(items, settled), settled


def verdict_record(item: JudgeItem, verdict: PairVerdict) -> dict[str, Any]:
    """One line of the judgements file: the question, both answers, scores per order, raw replies."""
    return {
        "question": item.question,
        "category": item.category,
        "candidate": item.candidate,
        "reference": item.reference,
        "candidate_score": verdict.a_score if verdict.ok else None,
        "reference_score": verdict.b_score if verdict.ok else None,
        "scores_candidate_first": verdict.scores_a_first,
        "scores_reference_first": verdict.scores_b_first,
        "parse_failures": verdict.parse_failures,
        "error": verdict.error,
        "raw_candidate_first": verdict.raw_a_first,
        "raw_reference_first": verdict.raw_b_first,
    }
