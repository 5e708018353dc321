"""The records a run keeps. Every record has a stable id derived from its content, never a position."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Origin = Literal["seed", "generated"]
Mode = Literal["hard", "easy"]
Pool = Literal["train", "cache"]


def normalise_text(text: str) -> str:
    """Unicode-normalised, whitespace-collapsed, case-folded: two texts that differ only there are one."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def content_id(*parts: str) -> str:
    """A short, stable hash of the given strings (16 hex digits)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def stable_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass
class Instruction:
    text: str
    input: str = ""
    domain: str | None = None
    task: str | None = None
    origin: Origin = "seed"
    parent_id: str | None = None
    mode: Mode | None = None
    iteration: int = 0
    reference: str | None = None  # an answer that came with the seed data (Alpaca "output"), if any
    meta: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = instruction_id(self.text, self.input)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def prompt(self) -> str:
        """The instruction as one user message."""
        return f"{self.text}\n\n{self.input}" if self.input else self.text


def instruction_id(text: str, input_text: str = "") -> str:
    return content_id(normalise_text(text), normalise_text(input_text))


@dataclass
class Response:
    instruction_id: str
    role: str  # "teacher" | "student" | ...
    model: str
    iteration: int
    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Judgement:
    """The referee's verdict on one instruction: both answer orders, raw replies kept."""

    instruction_id: str
    iteration: int
    raw_teacher_first: str | None
    raw_student_first: str | None
    teacher_scores: tuple[float, float] | None  # (teacher first, student first) orders
    student_scores: tuple[float, float] | None
    parse_failures: int = 0
    error: str | None = None  # why the instruction was left out, if it was

    @property
    def ok(self) -> bool:
        return self.error is None and self.teacher_scores is not None and self.student_scores is not None

    @property
    def teacher_score(self) -> float:
        assert self.teacher_scores is not None
        return sum(self.teacher_scores) / 2

    @property
    def student_score(self) -> float:
        assert self.student_scores is not None
        return sum(self.student_scores) / 2

    @property
    def gap(self) -> float:
        return self.teacher_score - self.student_score

    def is_hard(self, tau: float) -> bool:
        """Hard for the student (Lion's discrimination): the teacher's score beats the student's by tau or more."""
        return self.gap >= tau

    @property
    def orders_agree(self) -> bool:
        """Both orders prefer the same model (or both call it a tie)."""
        assert self.teacher_scores and self.student_scores
        t, s = self.teacher_scores, self.student_scores
        return same_preference((t[0], s[0]), (t[1], s[1]))


def same_preference(first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Two (a, b) score pairs, one per answer order, prefer the same answer or both call it a tie."""
    d1, d2 = first[0] - first[1], second[0] - second[1]
    return (d1 > 0) == (d2 > 0) and (d1 < 0) == (d2 < 0)


@dataclass
class PseudoTarget:
    input_id: str
    index: int  # k: which of the K pseudo-targets of this input
    text: str
    method: str  # "beam" | "sampling" | "high_temperature" | "api"
    teacher: str
    params: dict[str, Any] = field(default_factory=dict)
    logprobs: list[dict[str, Any]] | None = None  # per token: {"token", "logprob", "top": [[tok, lp], ...]}
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = content_id(self.input_id, str(self.index), self.method, self.teacher, stable_json(self.params))
