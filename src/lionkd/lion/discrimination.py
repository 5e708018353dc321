"""Discrimination: find the Cache Pool instructions the student is still bad at.

The teacher and the current student answer every Cache Pool instruction; the referee scores each
pair twice (teacher first, then student first) and each model's score is the mean of its two.
An instruction is hard when d = teacher - student >= tau, easy otherwise. One the referee could not
be read on (after retries) is left out of both sets and counted, never scored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from rich.progress import Progress

from ..config import RunConfig
from ..llm.factory import request_defaults
from ..records import Instruction, Judgement, Response
from ..referee import RefereeCallError, parse_scores, stream_judgements
from ..store import Store
from .calls import CallsFailed, collect_answers, run_async
from .prompts import LionPrompts, student_messages
from .role_checks import FIRST_BATCH, check_share
from .students import open_student


@dataclass
class Split:
    hard: list[str]  # instruction ids, in Cache Pool order
    easy: list[str]
    excluded: list[str]  # the referee could not be read: in neither set


def split_hard_easy(cache_ids: Sequence[str], judgements: dict[str, Judgement], tau: float) -> Split:
    split = Split([], [], [])
    for i in cache_ids:
        j = judgements.get(i)
        if j is None or not j.ok:
            split.excluded.append(i)
        elif j.is_hard(tau):
            split.hard.append(i)
        else:
            split.easy.append(i)
    return split


def student_max_tokens(cfg: RunConfig) -> int:
    """The student's answer length limit: its own setting, else the teacher's (a shorter limit cuts
    answers the teacher would have finished, and the referee calls them worse)."""
    return cfg.student.generation.max_new_tokens or cfg.teacher.max_tokens


async def _judge(referee: Any, store: Store, instructions: Sequence[Instruction], teacher: dict[str, Response],
                 student: dict[str, Response], *, prompts: LionPrompts, cfg: RunConfig, iteration: int,
                 progress: Progress) -> None:
    done = store.judgements(iteration)
    # an unreadable verdict is asked again (free from the call cache unless the referee or its prompt changed)
    todo = [ins for ins in instructions if ins.id not in done or not done[ins.id].ok]
    judged = [j for j in done.values() if j.ok]
    task = progress.add_task(f"iteration {iteration}: referee judges both orders", total=len(instructions),
                             completed=len(instructions) - len(todo))
    items = [(ins.prompt, teacher[ins.id].text, student[ins.id].text) for ins in todo]
    try:
        async for i, verdict in stream_judgements(_FirstReplies(referee, cfg), items, prompt=prompts.referee,
                                                  params=request_defaults(cfg.referee),
                                                  retries=cfg.lion.referee_retries, iteration=iteration):
            judged.append(verdict.as_judgement(todo[i].id, iteration))
            store.add_judgement(judged[-1])
            progress.advance(task)
    except RefereeCallError as exc:
        raise CallsFailed(f"referee: {exc}; finished work is saved, run the same command again to retry") from None
    progress.remove_task(task)
    check_verdicts(cfg, referee.model, judged)


class _FirstReplies:
    """The referee, with its first replies read as they arrive. A verdict is settled only after every
    retry of its batch, so waiting for verdicts would pay for all retries of a referee that cannot be
    read; its first FIRST_BATCH pairs of replies show it at once."""

    def __init__(self, referee: Any, cfg: RunConfig) -> None:
        self.referee, self.cfg = referee, cfg
        self.model = referee.model
        self.replies: list[str] = []

    async def stream(self, requests: Sequence[Any], iteration: int | None = None) -> AsyncIterator[tuple[int, Any]]:
        async for k, result in self.referee.stream(requests, iteration=iteration):
            if result.ok and len(self.replies) < 2 * FIRST_BATCH:
                self.replies.append(result.choices[0].text)
                if len(self.replies) == 2 * FIRST_BATCH:
                    unreadable = [r for r in self.replies if parse_scores(r) is None]
                    check_share(role="referee", model=self.model, good=len(self.replies) - len(unreadable),
                                total=len(self.replies), floor=self.cfg.lion.min_readable_verdicts,
                                what="replies could be read", failing=unreadable, key="lion.min_readable_verdicts",
                                advice=REFEREE_ADVICE)
            yield k, result


REFEREE_ADVICE = "use a referee model that writes the two score lines, or fix lion.prompts.referee"


def check_verdicts(cfg: RunConfig, model: str, judged: Sequence[Judgement]) -> None:
    """Stop when too few of the referee's verdicts could be read (`lion.min_readable_verdicts`)."""
    unreadable = [r for j in judged if not j.ok for r in (j.raw_teacher_first, j.raw_student_first)
                  if r is not None and parse_scores(r) is None]
    check_share(role="referee", model=model, good=sum(j.ok for j in judged), total=len(judged),
                floor=cfg.lion.min_readable_verdicts, what="verdicts could be read", failing=unreadable,
                key="lion.min_readable_verdicts", advice=REFEREE_ADVICE)


def discriminate(cfg: RunConfig, store: Store, teacher: Any, referee: Any, prompts: LionPrompts, iteration: int,
                 progress: Progress) -> tuple[Split, dict[str, Judgement]]:
    """Answer, judge and split the Cache Pool of `iteration`."""
    from ..llm.cache import CachedLLM

    cache_ids = store.pool(iteration, "cache")
    instructions = store.instructions(cache_ids)
    teacher_answers = run_async(collect_answers(
        teacher, store, instructions, role="teacher", messages=lambda ins: prompts.teacher_messages(ins.prompt),
        params=request_defaults(cfg.teacher), iteration=iteration, progress=progress,
        label=f"iteration {iteration}: teacher answers the cache pool", min_nonempty=cfg.lion.min_teacher_answers,
    ), teacher)
    gen = cfg.student.generation
    with open_student(cfg, iteration) as backend:
        student = CachedLLM(backend, store, role="student")
        student_answers = run_async(collect_answers(
            student, store, instructions, role="student",
            messages=lambda ins: student_messages(ins.prompt, cfg.student.system_prompt),
            params={"temperature": gen.temperature, "top_p": gen.top_p, "max_tokens": student_max_tokens(cfg),
                    "seed": cfg.seed},
            iteration=iteration, progress=progress, label=f"iteration {iteration}: student answers the cache pool",
        ), student)
    run_async(_judge(referee, store, instructions, teacher_answers, student_answers, prompts=prompts, cfg=cfg,
                     iteration=iteration, progress=progress), referee)
    judgements = store.judgements(iteration)
    return split_hard_easy(cache_ids, judgements, cfg.lion.tau), judgements
