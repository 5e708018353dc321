"""Imitation: the teacher answers the Train Pool, and the student learns to answer the same way.

Answers are persisted one by one as `Response` records (and every call in the call cache), so an
interrupted stage asks only for what is missing. Training goes through the KD engine's
`train_student`: sequence-level KD on the teacher's text (loss on answer tokens only) when the
teacher is a black box, logit KD when the teacher is a local model (`backend: hf`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rich.progress import Progress

from ..config import RunConfig
from ..errors import UserError
from ..llm.base import GenRequest, Message
from ..llm.factory import request_defaults
from ..records import Instruction, Response
from ..store import Store
from .prompts import LionPrompts, student_messages

T = TypeVar("T")


class CallsFailed(UserError):
    """Some model calls failed after the backend's own retries; finished work is saved, a rerun retries."""


def run_async(coro: Coroutine[Any, Any, T], *llms: Any) -> T:
    """Run one stage's calls in a fresh event loop, and close the models' connections inside that loop."""

    async def main() -> T:
        try:
            return await coro
        finally:
            for llm in llms:
                await llm.aclose()

    return asyncio.run(main())


async def collect_answers(
    llm: Any,
    store: Store,
    instructions: Sequence[Instruction],
    *,
    role: str,
    messages: Callable[[Instruction], list[Message]],
    params: dict[str, Any],
    iteration: int,
    progress: Progress,
    label: str,
) -> dict[str, Response]:
    """Every instruction's answer by `llm`, as `Response(role, model=llm.model)` records of `iteration`.

    Answers already stored for this iteration are reused; the others are asked for (the call cache
    makes repeats of earlier iterations free) and stored as each arrives.
    """
    answers = store.responses(role, iteration, model=llm.model)
    missing = [ins for ins in instructions if ins.id not in answers]
    task = progress.add_task(label, total=len(instructions), completed=len(instructions) - len(missing))
    requests = [GenRequest.chat(messages(ins), **params) for ins in missing]
    failures: list[str] = []
    async for i, result in llm.stream(requests, iteration=iteration):
        progress.advance(task)
        if not result.ok:
            failures.append(str(result.error))
            continue
        choice = result.choices[0]
        response = Response(
            instruction_id=missing[i].id, role=role, model=llm.model, iteration=iteration, text=choice.text.strip(),
            finish_reason=choice.finish_reason, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )
        store.add_response(response)
        answers[response.instruction_id] = response
    progress.remove_task(task)
    if failures:
        raise CallsFailed(f"{role}: {len(failures)} call(s) failed, e.g. {failures[0]}; "
                          "finished work is saved, run the same command again to retry")
    return answers


def training_examples(instructions: Sequence[Instruction], answers: dict[str, Response],
                      system_prompt: str | None = None) -> list[Any]:
    from ..kd.data import TrainExample

    return [TrainExample(messages=student_messages(ins.prompt, system_prompt), target=answers[ins.id].text)
            for ins in instructions if ins.id in answers]


def replay_examples(store: Store, iteration: int, fraction: float, seed: int,
                    system_prompt: str | None = None) -> list[Any]:
    """A seeded sample of `fraction` of the data the student was trained on in earlier iterations."""
    if fraction <= 0 or iteration <= 1:
        return []
    earlier: list[Any] = []
    for k in range(1, iteration):
        ids = store.pool(k, "train")
        earlier += training_examples(store.instructions(ids), store.responses("teacher", k), system_prompt)
    count = round(fraction * len(earlier))
    return random.Random(f"{seed}-{iteration}-replay").sample(earlier, count)


def student_init(cfg: RunConfig, iteration: int) -> str:
    """Where iteration `iteration` starts training from: the base student, then the previous iteration's."""
    if iteration == 1:
        from ..llm.models import resolve_model_path

        return str(resolve_model_path(cfg.student.model))
    return str(student_dir(cfg, iteration - 1))


def student_dir(cfg: RunConfig, iteration: int) -> Path:
    return Path(cfg.run_dir) / "students" / f"iter-{iteration}"


def answer_train_pool(cfg: RunConfig, store: Store, teacher: Any, prompts: LionPrompts, iteration: int,
                      progress: Progress) -> tuple[list[Instruction], dict[str, Response]]:
    """The teacher's answer to every Train Pool instruction of `iteration`."""
    instructions = store.instructions(store.pool(iteration, "train"))
    answers = run_async(collect_answers(
        teacher, store, instructions, role="teacher", messages=lambda ins: prompts.teacher_messages(ins.prompt),
        params=request_defaults(cfg.teacher), iteration=iteration, progress=progress,
        label=f"iteration {iteration}: teacher answers the train pool",
    ), teacher)
    return instructions, answers


def train(cfg: RunConfig, store: Store, instructions: Sequence[Instruction], answers: dict[str, Response],
          iteration: int, show_progress: bool) -> dict[str, Any]:
    """Fine-tune the previous student on (instruction, teacher answer) pairs, plus replay; returns metrics.

    A finished training (its saved directory) is reused as it is; an interrupted one resumes from
    its last checkpoint (both handled by `train_student`).
    """
    from ..kd.train import train_student

    system = cfg.student.system_prompt
    examples = training_examples(instructions, answers, system)
    replay = replay_examples(store, iteration, cfg.student.train.replay_fraction, cfg.seed, system)
    white_box = cfg.teacher.backend == "hf"
    kd_teacher = None
    if white_box:
        from ..llm.models import resolve_model_path

        kd_teacher = str(resolve_model_path(cfg.teacher.model))
    metrics = train_student(
        student_init(cfg, iteration), examples + replay, student_dir(cfg, iteration),
        settings=cfg.student.train, teacher=kd_teacher, kd=cfg.kd if white_box else None,
        template=cfg.student.template, lora=cfg.student.lora, progress=show_progress,
    )
    return {"examples": len(examples), "replayed": len(replay), "train_loss": metrics.get("loss"),
            "train_steps": metrics.get("steps"), "logit_kd": white_box}
