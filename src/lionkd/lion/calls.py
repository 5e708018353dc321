"""The model calls of a Lion stage: one event loop per stage, answers collected into the run store as
they arrive, and `CallsFailed` when some calls failed after the backend's own retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from rich.progress import Progress

from ..errors import UserError
from ..llm.base import GenRequest, Message
from ..records import Instruction, Response
from ..store import Store

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
