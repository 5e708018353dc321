"""The referee's verdict on one pair of answers, and what a set of verdicts says.

`PairVerdict` is role-agnostic: answer a against answer b, scored with a shown first and with b
shown first. The Lion loop stores it as a `records.Judgement` (a = teacher, b = student):
`as_judgement` and `from_judgement` are the only way between the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..records import Judgement, same_preference

UNPARSEABLE = "unparseable referee reply"  # why a pair whose replies stayed unreadable is left out


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

    def as_judgement(self, instruction_id: str, iteration: int) -> Judgement:
        """This verdict as the Lion loop stores it: a = teacher, b = student."""
        both = self.scores_a_first is not None and self.scores_b_first is not None and self.error is None
        return Judgement(
            instruction_id=instruction_id, iteration=iteration,
            raw_teacher_first=self.raw_a_first, raw_student_first=self.raw_b_first,
            teacher_scores=(self.scores_a_first[0], self.scores_b_first[0]) if both else None,  # type: ignore[index]
            student_scores=(self.scores_a_first[1], self.scores_b_first[1]) if both else None,  # type: ignore[index]
            parse_failures=self.parse_failures, error=self.error,
        )

    @classmethod
    def from_judgement(cls, j: Judgement) -> PairVerdict:
        """A stored judgement's scores as a verdict (a = teacher, b = student); raw replies are left out."""
        return cls(scores_a_first=(j.teacher_scores[0], j.student_scores[0]) if j.ok else None,  # type: ignore[index]
                   scores_b_first=(j.teacher_scores[1], j.student_scores[1]) if j.ok else None,  # type: ignore[index]
                   parse_failures=j.parse_failures, error=j.error)


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
