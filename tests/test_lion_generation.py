"""Seeds, filters and the dry-run plan of the Lion loop (no models involved)."""

from __future__ import annotations

import random
from pathlib import Path

from lionkd.config import Price, RunConfig
from lionkd.lion.discrimination import split_hard_easy
from lionkd.lion.generation import (
    clean_instruction,
    draw_seeds,
    learnable_weights,
    reject_reason,
    seed_counts,
    slot_seed,
)
from lionkd.lion.loop import plan_run, plan_table
from lionkd.records import Instruction, Judgement


def _judgement(iid: str, teacher: float, student: float, error: str | None = None) -> Judgement:
    scores = None if error else (teacher, teacher), (student, student)
    return Judgement(iid, 1, "t", "s", scores[0] if scores else None, scores[1] if scores else None, error=error)


def test_split_hard_easy_is_inclusive_and_excludes_unreadable() -> None:
    js = {"a": _judgement("a", 9, 8), "b": _judgement("b", 9, 7.5), "c": _judgement("c", 6, 8),
          "d": _judgement("d", 0, 0, error="unparseable referee reply")}
    split = split_hard_easy(["a", "b", "c", "d", "e"], js, tau=1.0)
    assert split.hard == ["a", "b"] and split.easy == ["c"] and split.excluded == ["d", "e"]


def test_seed_counts_and_draws_are_reproducible() -> None:
    assert seed_counts(10, 0.5, True, True) == (5, 5)
    assert seed_counts(7, 0.75, True, True) == (5, 2)
    assert seed_counts(10, 0.5, False, True) == (0, 10)
    assert seed_counts(10, 0.5, True, False) == (10, 0)
    assert seed_counts(10, 0.5, False, False) == (0, 0)
    ids = [f"i{k}" for k in range(5)]
    a = draw_seeds(ids, 12, random.Random("0-1-generation-0"))
    assert a == draw_seeds(ids, 12, random.Random("0-1-generation-0"))
    assert sorted(a[:5]) == ids and sorted(a[5:10]) == ids  # every seed once before any repeats
    assert draw_seeds(ids, 12, random.Random("0-1-generation-1")) != a
    assert slot_seed(0, None, 1, 0, 3) == slot_seed(0, None, 1, 0, 3) != slot_seed(0, None, 1, 0, 4)


def test_learnable_weights_favour_partly_learned_groups() -> None:
    judged, js = [], {}
    for task, wins in (("mastered", 10), ("hopeless", 0), ("halfway", 5)):
        for k in range(10):
            ins = Instruction(text=f"{task} {k}", task=task)
            judged.append(ins)
            js[ins.id] = _judgement(ins.id, 9, 9 if k < wins else 2)
    seeds = [Instruction(text=f"{t} seed", task=t) for t in ("mastered", "hopeless", "halfway")]
    w = learnable_weights(seeds, judged, js, tau=1.0, group_of=lambda ins: ins.task)
    assert w[2] > w[0] and w[2] > w[1] and abs(w[0] - w[1]) < 1e-12
    draws = random.Random(0).choices(range(3), weights=w, k=3000)
    assert draws.count(2) > 1.5 * draws.count(0)


def test_filters() -> None:
    assert clean_instruction('  "Sort these numbers: 3, 1, 2."  ') == "Sort these numbers: 3, 1, 2."
    assert reject_reason("Sort these numbers: 3, 1, 2.", "stop", 4) is None
    assert reject_reason("Sort these numbers please", "length", 4) == "cut_off"
    assert reject_reason("", "stop", 4) == "empty"
    assert reject_reason("Sort them.", "stop", 4) == "too_short"
    assert reject_reason("- Sort these numbers: 3, 1, 2.", "stop", 4) == "starts_with_punctuation"
    assert reject_reason("Here it is [Seed instruction] sort the list", "stop", 4) == "prompt_echo"
    assert reject_reason("Écris un poème sur la mer", "stop", 4) is None
    # a reply about the prompt's task is not a task; a request that mentions instructions is
    for about in ("Here is a new task: sort the numbers 3, 1, 2.", "Rewrite the instruction above with new numbers.",
                  "This task asks you to reverse a word.", "The new instruction: add 4 and 5 together."):
        assert reject_reason(about, "stop", 4) == "about_the_task", about
    assert reject_reason("Write instructions for assembling a shelf from a kit.", "stop", 4) is None
    assert reject_reason("Your task is to classify the review as positive or negative.", "stop", 4) is None
    assert reject_reason("Here is a small task. Reverse the word apple.", "stop", 4) is None
    assert reject_reason("Sure, here it is: reverse the word apple.", "stop", 4) == "about_the_task"


def test_sandbox_instructions_are_never_taken_for_talk_about_the_task() -> None:
    from lionkd.sandbox import seed_pool

    texts = [r["instruction"] for r in seed_pool(2000, seed=3)]
    assert [t for t in texts if reject_reason(t, "stop", 1) == "about_the_task"] == []


def test_prompts_ask_for_similar_length_and_difficulty_and_see_the_instruction_only() -> None:
    from lionkd.lion.prompts import GENERATOR_EASY, GENERATOR_HARD

    for template in (GENERATOR_HARD, GENERATOR_EASY):
        flat = " ".join(template.split())
        assert "about as long and about as difficult as the example" in flat
    assert "rarer" in GENERATOR_EASY and "rarer" not in GENERATOR_HARD


def test_dry_run_plan(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(f'{{"instruction": "Write a short poem about the sea number {k}."}}'
                               for k in range(100)), encoding="utf-8")
    cfg = RunConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "lion": {"seed_pool": str(seeds), "iterations": 2, "new_per_iteration": 10,
                                                   "referee_retries": 1, "generation_rounds": 2},
        "teacher": {"max_tokens": 100, "price": Price(input=1.0, output=2.0).model_dump()},
        "referee": {"max_tokens": 50},
    })
    rows = {(r.iteration, r.role): r for r in plan_run(cfg)}
    assert rows[1, "teacher"].calls == 100 and rows[2, "teacher"].calls == 10 and rows[3, "teacher"].calls == 10
    assert rows[1, "referee"].calls == 2 * 100 * 2 and rows[2, "referee"].calls == 2 * 110 * 2
    assert rows[2, "generator"].calls == 20 and (3, "referee") not in rows
    t = rows[1, "teacher"]
    assert t.completion_tokens == 100 * 100
    assert t.cost == (t.prompt_tokens * 1.0 + t.completion_tokens * 2.0) / 1e6
    assert rows[1, "referee"].cost is None
    assert plan_table(plan_run(cfg)).row_count == len(rows) + 4
    assert not (tmp_path / "run").exists()  # a dry run spends and writes nothing


def test_cli_dry_run_and_config_errors(tmp_path: Path, cli) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Name three rivers of Europe."}\n{"instruction": "Name two lakes of Asia."}\n',
                     encoding="utf-8")
    good = tmp_path / "good.yaml"
    good.write_text("lion: {seed_pool: seeds.jsonl, iterations: 1, new_per_iteration: 5}\n"
                    "teacher: {price: {input: 0.15, output: 0.6}}\n", encoding="utf-8")
    result = cli("run", str(good), "--dry-run", env={"OPENAI_API_KEY": ""})
    assert result.returncode == 0, result.stderr
    assert "Dry run" in result.stdout and "teacher" in result.stdout and "referee" in result.stdout
    assert not (tmp_path / "runs").exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text("lion: {seed_pool: seeds.jsonl, prompts: {referee: 'Judge {instruction} {answer_1}'}}\n",
                   encoding="utf-8")
    result = cli("run", str(bad), "--dry-run")
    assert result.returncode == 2
    assert "lion.prompts.referee: missing placeholder {answer_2}" in result.stderr

    no_seeds = tmp_path / "no_seeds.yaml"
    no_seeds.write_text("lion: {iterations: 1}\n", encoding="utf-8")
    result = cli("run", str(no_seeds), "--dry-run")
    assert result.returncode == 2 and "lion.seed_pool" in result.stderr


# --------------------------------------------------------------------------- the generation stage


class PickyGenerator:
    """A generator whose hard replies mostly fail the filters (too short), and easy ones never do.

    Good replies are random word strings (novel against each other); `copy` seeds are echoed back
    word for word, as a lazy generator would.
    """

    model = "picky"

    def __init__(self, hard_failure: float, copy: str | None = None) -> None:
        self.hard_failure = hard_failure
        self.copy = copy
        self.words = [f"w{k}" for k in range(3000)]

    async def stream(self, requests, iteration=None):
        from lionkd.llm.base import Choice, GenResult

        for i, req in enumerate(requests):
            prompt = req.messages[-1][1]
            rng = random.Random(req.seed)
            if self.copy is not None and self.copy in prompt:
                text = self.copy
            elif "rarer" not in prompt and rng.random() < self.hard_failure:
                text = "Too short."
            else:
                text = "Explain " + " ".join(rng.sample(self.words, 10))
            yield i, GenResult(choices=[Choice(text)])

    async def aclose(self) -> None:
        pass


def _generation_store(tmp_path: Path, seeds: list[Instruction]):
    from lionkd.store import Store

    store = Store.open_run(tmp_path / "run")
    store.add_instructions(seeds)
    store.set_pool(1, "cache", [s.id for s in seeds])
    return store


def _run_generation(tmp_path: Path, generator, seeds: list[Instruction], hard: list[str], easy: list[str], **lion):
    from rich.progress import Progress

    from lionkd.lion.generation import generate
    from lionkd.lion.prompts import LionPrompts

    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "lion": lion})
    store = _generation_store(tmp_path, seeds)
    with Progress(disable=True) as progress:
        out = generate(cfg, store, generator, LionPrompts(), 1, hard=hard, easy=easy, judgements={},
                       progress=progress)
    store.close()
    return out


def test_hard_easy_split_holds_in_what_is_kept(tmp_path: Path) -> None:
    seeds = [Instruction(text=f"Seed task number {k} about topic {k * 7}", domain="d") for k in range(40)]
    ids = [s.id for s in seeds]
    out = _run_generation(tmp_path, PickyGenerator(hard_failure=0.7), seeds, ids[:20], ids[20:],
                          new_per_iteration=200, generation_rounds=4)
    assert (out.target["hard"], out.target["easy"]) == (100, 100)
    # 70% of hard replies fail: the hard side is asked again, with more seeds, until it has its 100
    assert out.kept["hard"] == 100 and out.kept["easy"] == 100
    assert sum(ins.mode == "hard" for ins in out.new) == 100
    assert out.seeds["easy"] == 100 and 250 < out.seeds["hard"] <= 4 * 100  # within the rounds x target budget
    assert out.filter_rejections["too_short"] == out.seeds["hard"] - 100 - out.surplus


def test_generation_stops_at_the_budget_of_a_hopeless_side(tmp_path: Path) -> None:
    seeds = [Instruction(text=f"Seed task number {k} about topic {k * 7}", domain="d") for k in range(40)]
    ids = [s.id for s in seeds]
    out = _run_generation(tmp_path, PickyGenerator(hard_failure=1.0), seeds, ids[:20], ids[20:],
                          new_per_iteration=20, generation_rounds=3)
    assert out.kept["hard"] == 0 and out.kept["easy"] == 10
    assert out.seeds["hard"] == 3 * 10 and out.seeds["easy"] == 10  # never more than rounds x target


def test_novelty_compares_instruction_text_not_its_input(tmp_path: Path) -> None:
    # an Alpaca seed with a long input: a copy of its instruction is a copy, whatever the input says
    seed = Instruction(text="Summarize the following article in three sentences.",
                       input=" ".join(f"token{k}" for k in range(60)), domain="d")
    other = Instruction(text="List four uses of copper in electronics.", domain="d")
    out = _run_generation(tmp_path, PickyGenerator(hard_failure=0.0, copy=seed.text), [seed, other],
                          [seed.id], [other.id], new_per_iteration=2, generation_rounds=1)
    assert out.novelty_rejections == 1 and out.kept["hard"] == 0
    assert all(ins.text != seed.text for ins in out.new)


def test_generator_sees_the_instruction_text_only(tmp_path: Path) -> None:
    seed = Instruction(text="Summarize the following article in three sentences.",
                       input="The river flooded the town twice this spring.", domain="d")
    seen: list[str] = []

    class Recording(PickyGenerator):
        async def stream(self, requests, iteration=None):
            seen.extend(req.messages[-1][1] for req in requests)
            async for item in super().stream(requests, iteration):
                yield item

    _run_generation(tmp_path, Recording(hard_failure=0.0), [seed], [seed.id], [], new_per_iteration=1,
                    generation_rounds=1)
    assert seen and all(seed.text in p and "river flooded" not in p for p in seen)


def test_student_answers_as_long_as_the_teacher_and_cut_answers_are_counted(tmp_path: Path) -> None:
    from lionkd.lion.discrimination import Split, student_max_tokens
    from lionkd.lion.loop import truncation_metrics
    from lionkd.records import Response
    from lionkd.store import Store

    cfg = RunConfig.model_validate({"teacher": {"max_tokens": 700}})
    assert cfg.student.generation.max_new_tokens is None and student_max_tokens(cfg) == 700
    cfg = RunConfig.model_validate({"teacher": {"max_tokens": 700}, "student": {"generation": {"max_new_tokens": 64}}})
    assert student_max_tokens(cfg) == 64

    store = Store.open_run(tmp_path / "run")
    seeds = [Instruction(text=f"Task {k}") for k in range(4)]
    store.add_instructions(seeds)
    store.set_pool(1, "cache", [s.id for s in seeds])
    for k, s in enumerate(seeds):
        store.add_response(Response(instruction_id=s.id, role="student", model="m", iteration=1, text="x",
                                    finish_reason="length" if k < 2 else "stop"))
        store.add_response(Response(instruction_id=s.id, role="teacher", model="t", iteration=1, text="y"))
    m = truncation_metrics(store, 1, Split(hard=[seeds[0].id, seeds[3].id], easy=[seeds[1].id, seeds[2].id],
                                           excluded=[]))
    assert m["student_truncated"] == 2 and m["student_truncated_ratio"] == 0.5
    assert m["hard_with_truncated_student"] == 1 and m["teacher_truncated"] == 0
    store.close()


def test_the_largest_run_a_config_allows_is_planned_at_once(tmp_path: Path) -> None:
    """`lion.iterations` is bounded (a billion made --dry-run loop for ever): the plan of the largest
    allowed run has one row per role and iteration, and its totals are the closed-form sums."""
    import pytest
    from pydantic import ValidationError

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Name three rivers of Europe."}\n{"instruction": "Name two lakes of Asia."}\n',
                     encoding="utf-8")
    with pytest.raises(ValidationError):
        RunConfig.model_validate({"lion": {"iterations": 1_000_000_000}})
    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"),
                                    "lion": {"seed_pool": str(seeds), "iterations": 1000, "new_per_iteration": 10}})
    rows = plan_run(cfg)
    K, n, s = 1000, 10, 2
    assert sum(r.calls for r in rows if r.role == "teacher") == s + K * n
    # the Cache Pool grows by n each iteration: sum over k of 2 (s + (k - 1) n) (1 + referee_retries)
    assert sum(r.calls for r in rows if r.role == "referee") == 2 * (K * s + n * K * (K - 1) // 2) * 3
