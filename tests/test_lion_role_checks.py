"""A teacher, referee or generator that cannot do its job stops the run after its first batch, in one line."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from rich.progress import Progress

from lionkd.config import RunConfig
from lionkd.lion.calls import collect_answers, run_async
from lionkd.lion.discrimination import _judge
from lionkd.lion.generation import generate
from lionkd.lion.imitation import training_examples
from lionkd.lion.prompts import LionPrompts
from lionkd.lion.role_checks import FIRST_BATCH, RoleCannotWork
from lionkd.llm.base import Choice, GenRequest, GenResult
from lionkd.records import Instruction, Response
from lionkd.report.lion_sections import lion_alerts
from lionkd.store import Store


class Scripted:
    """A role model that answers every request with `reply(request)` and counts what it was asked."""

    def __init__(self, model: str, reply: Callable[[GenRequest], str]) -> None:
        self.model, self.reply, self.asked = model, reply, 0

    async def stream(self, requests: Sequence[GenRequest], iteration: int | None = None
                     ) -> AsyncIterator[tuple[int, GenResult]]:
        for i, req in enumerate(requests):
            self.asked += 1
            yield i, GenResult(choices=[Choice(self.reply(req))], prompt_tokens=1, completion_tokens=1)

    async def aclose(self) -> None:
        pass


def setup_run(tmp_path: Path, n: int = 40, **lion: float) -> tuple[RunConfig, Store, list[Instruction]]:
    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "lion": lion})
    store = Store.open_run(cfg.run_dir)
    items = [Instruction(f"Write a sentence about the number {k}.", task=f"t{k % 3}") for k in range(n)]
    store.add_instructions(items)
    store.set_pool(1, "cache", [i.id for i in items])
    return cfg, store, items


def judge(cfg: RunConfig, store: Store, items: list[Instruction], referee: Scripted) -> None:
    answers = {role: {i.id: Response(i.id, role, role, 1, f"{role} answer") for i in items}
               for role in ("teacher", "student")}
    with Progress(disable=True) as p:
        run_async(_judge(referee, store, items, answers["teacher"], answers["student"],
                         prompts=LionPrompts.from_config(cfg.lion.prompts), cfg=cfg, iteration=1, progress=p))


def test_an_unreadable_referee_stops_after_its_first_batch(tmp_path: Path) -> None:
    cfg, store, items = setup_run(tmp_path)
    referee = Scripted("small-referee", lambda req: "I like them." if "number 1." in str(req.messages)
                       else "Both answers look fine to me, really.")
    with pytest.raises(RoleCannotWork) as info:
        judge(cfg, store, items, referee)
    line = str(info.value)
    assert "\n" not in line
    assert f"referee 'small-referee': only 0 of {2 * FIRST_BATCH} replies could be read (0%, below " \
           "lion.min_readable_verdicts 0.5)" in line
    assert "shortest failing reply: 'I like them.'" in line and "set lion.min_readable_verdicts: 0" in line
    assert referee.asked == 2 * FIRST_BATCH  # of 240 requests (40 items, 2 orders, 3 attempts)


def test_a_readable_referee_goes_on_and_zero_disables_the_check(tmp_path: Path) -> None:
    cfg, store, items = setup_run(tmp_path)
    judge(cfg, store, items, Scripted("good", lambda req: "Assistant 1: 8\nAssistant 2: 6"))
    assert sum(j.ok for j in store.judgements(1).values()) == len(items)

    cfg, store, items = setup_run(tmp_path / "off", min_readable_verdicts=0)
    judge(cfg, store, items, Scripted("bad", lambda req: "no scores here"))
    assert len(store.judgements(1)) == len(items) and not any(j.ok for j in store.judgements(1).values())
    alerts = lion_alerts({1: {"parse_rate": 0.0, "hard": 0, "easy": 0}, 2: {"parse_rate": 0.9}})
    assert len(alerts) == 1 and alerts[0].startswith("iteration 1: only 0% of the referee's replies could be read")


def test_a_referee_readable_at_first_but_not_later_stops_at_the_end_of_the_stage(tmp_path: Path) -> None:
    cfg, store, items = setup_run(tmp_path, n=40)
    early = {i.text for i in items[:12]}
    referee = Scripted("drifting", lambda req: "Assistant 1: 8\nAssistant 2: 6"
                       if any(t in str(req.messages) for t in early) else "hmm")
    with pytest.raises(RoleCannotWork, match=r"only 12 of 40 verdicts could be read"):
        judge(cfg, store, items, referee)
    assert len(store.judgements(1)) == 40  # the stage's work is stored; a rerun asks only the unreadable again


def test_a_generator_whose_replies_all_fail_the_filters_stops_after_its_first_round(tmp_path: Path) -> None:
    cfg, store, items = setup_run(tmp_path, new_per_iteration=20, generation_rounds=4)
    generator = Scripted("chatty", lambda req: "- Sure! Here is one.")
    ids = [i.id for i in items]
    with Progress(disable=True) as p, pytest.raises(RoleCannotWork) as info:
        generate(cfg, store, generator, LionPrompts.from_config(cfg.lion.prompts), 1, hard=ids[:20], easy=ids[20:],
                 judgements={}, progress=p)
    line = str(info.value)
    assert "generator 'chatty': only 0 of 20 replies passed the filters" in line
    assert "leading reject reason is starts_with_punctuation (20 replies)" in line
    assert "shortest failing reply: '- Sure! Here is one.'" in line
    assert generator.asked == 20  # one round of the four the budget allows


def collect(cfg: RunConfig, store: Store, items: list[Instruction], teacher: Scripted) -> dict[str, Response]:
    with Progress(disable=True) as p:
        return run_async(collect_answers(teacher, store, items, role="teacher",
                                         messages=lambda ins: [{"role": "user", "content": ins.text}], params={},
                                         iteration=1, progress=p, label="teacher",
                                         min_nonempty=cfg.lion.min_teacher_answers))


def test_empty_teacher_answers_stop_the_stage_or_are_counted_and_left_out(tmp_path: Path, capsys) -> None:
    cfg, store, items = setup_run(tmp_path)
    silent = Scripted("silent", lambda req: "  ")
    with pytest.raises(RoleCannotWork, match=r"teacher 'silent': only 0 of 8 answers are not empty"):
        collect(cfg, store, items, silent)
    assert silent.asked == FIRST_BATCH

    cfg, store, items = setup_run(tmp_path / "some")
    some = Scripted("some", lambda req: "" if "number 3." in str(req.messages) else "An answer.")
    answers = collect(cfg, store, items, some)
    assert "warning: teacher 'some' gave 1 empty answer(s) of 40 in iteration 1" in capsys.readouterr().err
    assert len(training_examples(items, answers)) == 39
