"""Imitation: the teacher answers the Train Pool, and the student learns to answer the same way.

Answers are persisted one by one as `Response` records (and every call in the call cache), so an
interrupted stage asks only for what is missing. Training goes through the KD engine's
`train_student`: sequence-level KD on the teacher's text (loss on answer tokens only) when the
teacher is a black box, logit KD when the teacher is a local model (`backend: hf`). With
`lion.imitation: on_policy` and a served teacher, the student also samples its own answers to the
Train Pool and learns the reverse KL to the teacher's scores of them (`kd/on_policy.py`); the
teacher's answers stay the off-policy share (`kd.on_policy.lmbda` of each batch is the student's).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from rich.progress import Progress

from ..config import RunConfig
from ..kd.job import TrainJob
from ..llm.factory import request_defaults
from ..records import Instruction, Response
from ..store import Store
from .calls import collect_answers, run_async
from .prompts import LionPrompts, student_messages
from .students import student_dir, student_init


def training_examples(instructions: Sequence[Instruction], answers: dict[str, Response],
                      system_prompt: str | None = None) -> list[Any]:
    from ..kd.examples import TrainExample

    return [TrainExample(messages=student_messages(ins.prompt, system_prompt), target=answers[ins.id].text)
            for ins in instructions if ins.id in answers and answers[ins.id].text]  # an empty answer teaches nothing


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


def answer_train_pool(cfg: RunConfig, store: Store, teacher: Any, prompts: LionPrompts, iteration: int,
                      progress: Progress) -> tuple[list[Instruction], dict[str, Response]]:
    """The teacher's answer to every Train Pool instruction of `iteration`."""
    instructions = store.instructions(store.pool(iteration, "train"))
    answers = run_async(collect_answers(
        teacher, store, instructions, role="teacher", messages=lambda ins: prompts.teacher_messages(ins.prompt),
        params=request_defaults(cfg.teacher), iteration=iteration, progress=progress,
        label=f"iteration {iteration}: teacher answers the train pool", min_nonempty=cfg.lion.min_teacher_answers,
    ), teacher)
    return instructions, answers


def train(cfg: RunConfig, store: Store, instructions: Sequence[Instruction], answers: dict[str, Response],
          iteration: int, show_progress: bool, teacher_system: str | None = None) -> dict[str, Any]:
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
    on_policy, objective = None, None
    if cfg.lion.imitation == "on_policy":
        from ..kd.on_policy import on_policy_setup

        on_policy = on_policy_setup(cfg, store, examples + replay, student_init(cfg, iteration), teacher_system)
        objective = {"ce": 1.0, "on_policy": 1.0}
        kd_teacher = None
    metrics = train_student(TrainJob(
        student_init(cfg, iteration), examples + replay, student_dir(cfg, iteration),
        settings=cfg.student.train, teacher=kd_teacher, kd=cfg.kd, objective=objective,
        template=cfg.student.template, lora=cfg.student.lora, progress=show_progress, on_policy=on_policy,
    ))
    info = {"examples": len(examples), "replayed": len(replay), "train_loss": metrics.get("loss"),
            "train_steps": metrics.get("steps"), "logit_kd": white_box and on_policy is None}
    if "on_policy" in metrics:
        info["on_policy"] = metrics["on_policy"]
    return info
