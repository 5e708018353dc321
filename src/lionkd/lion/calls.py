"""The model calls of a Lion stage: one event loop per stage, answers collected into the run store as
they arrive, and `CallsFailed` when some calls failed after the backend's own retries (mostly empty
teacher answers stop the stage: see `role_checks`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import Progress

from ..errors import UserError
from ..llm.base import GenRequest, Message
from ..records import Instruction, Response
from ..store import Store
from .role_checks import FIRST_BATCH, check_share

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
    min_nonempty: float = 0.0,
) -> dict[str, Response]:
    """Every instruction's answer by `llm`, as `Response(role, model=llm.model)` records of `iteration`.

    Answers already stored for this iteration are reused; the others are asked for (the call cache
    makes repeats of earlier iterations free) and stored as each arrives. With `min_nonempty` (the
    teacher's `lion.min_teacher_answers`), mostly empty answers stop the stage after its first batch
    or at its end; fewer are counted in a warning.
    """
    answers = store.responses(role, iteration, model=llm.model)
    missing = [ins for ins in instructions if ins.id not in answers]
    task = progress.add_task(label, total=len(instructions), completed=len(instructions) - len(missing))
    requests = [GenRequest.chat(messages(ins), **params) for ins in missing]
    failures: list[str] = []
    done = 0
    async for i, result in llm.stream(requests, iteration=iteration):
        progress.advance(task)
        done += 1
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
        if min_nonempty and done == FIRST_BATCH:
            _check_answers(role, llm.model, answers, min_nonempty)
    progress.remove_task(task)
    if failures:
        raise CallsFailed(f"{role}: {len(failures)} call(s) failed, e.g. {failures[0]}; "
                          "finished work is saved, run the same command again to retry")
    if min_nonempty:
        _check_answers(role, llm.model, answers, min_nonempty)
        empty = sum(1 for r in answers.values() if not r.text)
        if empty:
            Console(stderr=True).print(f"warning: {role} '{llm.model}' gave {empty} empty answer(s) of {len(answers)} "
                                       f"in iteration {iteration}; they are left out of training",
                                       markup=False, highlight=False, soft_wrap=True)
    return answers


def _check_answers(role: str, model: str, answers: dict[str, Response], floor: float) -> None:
    check_share(role=role, model=model, good=sum(1 for r in answers.values() if r.text), total=len(answers),
                floor=floor, what="answers are not empty", failing=[r.text for r in answers.values() if not r.text],
                key="lion.min_teacher_answers", advice="check the teacher's model, endpoint and max_tokens")
