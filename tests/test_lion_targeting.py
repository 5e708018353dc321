"""Lion's own targeting: groups from instruction text, the learnable hard band, the adaptive split and
novelty within a group (no models involved; groups found from the text alone unless a test says so)."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from lionkd.config import RunConfig
from lionkd.lion.groups import Grouping
from lionkd.lion.novelty import NoveltyFilter
from lionkd.lion.targeting import SPLIT_BOUNDS, Bandit, gap_progress, group_thresholds, progress_weights
from lionkd.records import Instruction, Judgement
from lionkd.sandbox import seed_pool


def _pool(n: int, seed: int, labels: bool) -> list[Instruction]:
    return [Instruction(text=r["instruction"], domain=r["domain"], task=r["task"] if labels else None)
            for r in seed_pool(n, seed=seed)]


def _truth(n: int, seed: int) -> dict[str, str]:
    return {Instruction(text=r["instruction"]).id: r["task"] for r in seed_pool(n, seed=seed)}


def _judgement(iid: str, iteration: int, gap: float) -> Judgement:
    return Judgement(iid, iteration, "t", "s", (9.0, 9.0), (9.0 - gap, 9.0 - gap))


def _purity(groups: list[str], truth: list[str]) -> float:
    """Share of instructions whose group's most common task type is their own."""
    return sum(max(c.values()) for c in _members(groups, truth).values()) / len(truth)


def test_text_groups_find_task_types_without_labels() -> None:
    pool, truth = _pool(600, 1, labels=False), _truth(600, 1)
    g = Grouping(pool, "auto", seed=0)
    assert g.how == "text" and len(g.names) == 24  # sqrt(600)
    groups, types = [g.of(ins) for ins in pool], [truth[ins.id] for ins in pool]
    shuffled = groups[:]
    random.Random(0).shuffle(shuffled)  # the same group sizes, blind to the text
    assert _purity(groups, types) >= 2.5 * _purity(shuffled, types)
    again = Grouping(pool, "text", seed=0)
    assert [again.of(ins) for ins in pool] == groups  # seeded: a rerun finds the same groups
    # instructions it was not fitted on go to groups of their own type as often as the pool's did
    fresh, fresh_truth = _pool(300, 9, labels=False), _truth(300, 9)
    majority = {grp: c.most_common(1)[0][0] for grp, c in _members(groups, types).items()}
    right = sum(majority.get(g.of(ins)) == fresh_truth[ins.id] for ins in fresh) / len(fresh)
    assert right >= 2.5 * _purity(shuffled, types) - 0.1


def _members(groups: list[str], truth: list[str]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for g, t in zip(groups, truth, strict=True):
        out[g][t] += 1
    return out


def test_task_groups_give_unlabelled_instructions_a_task_not_a_domain() -> None:
    """The defect of the first learnable weighting: long-tail instructions (no task label) were grouped
    by domain beside seeds grouped by type. Now they join the closest task type."""
    pool = _pool(400, 2, labels=True)
    generated = [Instruction(text=ins.text + " Thanks!", domain=ins.domain, origin="generated", mode="easy")
                 for ins in _pool(100, 3, labels=True)]
    g = Grouping(pool + generated, "auto")
    assert g.how == "task"
    truth = _truth(100, 3)
    groups = [g.of(ins) for ins in generated]
    assert all(x.startswith("task:") for x in groups)
    right = sum(x == f"task:{truth[Instruction(text=ins.text[:-len(' Thanks!')]).id]}"
                for x, ins in zip(groups, generated, strict=True))
    assert right / len(generated) >= 0.8  # one type of 14 by chance would be ~0.07


def test_progress_favours_the_hard_groups_the_student_is_learning() -> None:
    pool = [Instruction(text=f"{t} item {k}", task=t) for t in ("moving", "stuck", "new") for k in range(10)]
    before = {i.id: _judgement(i.id, 1, 6.0) for i in pool if i.task != "new"}
    now = {i.id: _judgement(i.id, 2, 2.0 if i.task == "moving" else 6.0) for i in pool}

    def group(ins: Instruction) -> str:
        return ins.task or ""

    progress = gap_progress(pool, before, now, group)
    assert progress["moving"] == pytest.approx(40 / 12) and progress["stuck"] == 0.0 and "new" not in progress
    seeds = [pool[0], pool[10], pool[20]]
    w = progress_weights(seeds, progress, group)
    assert w is not None and w[0] > 5 * w[1] and w[1] > 0 and w[2] == w[1]  # a stuck group keeps a little weight
    assert progress_weights(seeds, {}, group) is None  # iteration 1: nothing measured, the paper's uniform draw
    # nothing moved anywhere: no signal, uniform
    flat = gap_progress(pool, before, {i.id: _judgement(i.id, 2, 6.5) for i in pool}, group)
    assert len(set(progress_weights(seeds, flat, group) or [])) == 1


def test_bandit_moves_seeds_and_split_to_where_the_data_paid_off() -> None:
    seeds = {g: Instruction(text=f"seed of {g}", task=g) for g in ("a", "b", "c")}
    # what the last iteration generated: hard from a landed in a (which moved), easy from b landed in c (stuck)
    generated = [Instruction(text=f"new a {k}", task="a", parent_id=seeds["a"].id, mode="hard") for k in range(8)]
    generated += [Instruction(text=f"new c {k}", task="c", parent_id=seeds["b"].id, mode="easy") for k in range(8)]
    progress = {"a": 2.0, "b": 0.5, "c": 0.0}

    def group(ins: Instruction) -> str:
        return ins.task or ""

    bandit = Bandit(generated, {s.id: s for s in seeds.values()}, progress, group)
    assert bandit.hard_fraction() == SPLIT_BOUNDS[1]  # hard paid off, easy did not: as far as the bound allows
    w = bandit.weights(list(seeds.values()), "hard", group)
    assert w is not None and w[0] > w[1] and w[1] == w[2]  # untried arms: the prompt's value
    worse = Bandit(generated, {s.id: s for s in seeds.values()}, {"a": 0.0, "b": 0.0, "c": 1.0}, group)
    assert worse.hard_fraction() == SPLIT_BOUNDS[0]
    assert Bandit([], {}, progress, group).hard_fraction(0.5) == 0.5  # iteration 1: the configured start


def test_group_novelty_measures_a_group_against_itself_and_still_rejects_near_copies() -> None:
    templated = [Instruction(text=f"Reverse the word {w}.", task="t") for w in ("apple", "stone", "cloud", "river")]
    rng = random.Random(0)
    vocab = [f"w{k}" for k in range(500)]
    diverse = [Instruction(text="Explain " + " ".join(rng.sample(vocab, 8)), task="d") for _ in range(6)]

    def group(ins: Instruction) -> str:
        return ins.task or ""

    t = group_thresholds(templated + diverse, group, floor=0.7, ceiling=0.9)
    assert t["d"] == 0.7 and 0.7 < t["t"] <= 0.9
    assert t["t"] == pytest.approx(0.75)  # each member shares 3 of its 4 words with every other
    # a new member as far from the pool as the members are from each other is kept (the paper's 0.7
    # would reject it), a copy is not
    paper = NoveltyFilter([i.text for i in templated], threshold=0.7)
    assert paper.add_if_novel("Reverse the word tiger.")[0] is False
    filt = NoveltyFilter([i.text for i in templated], threshold=0.7)
    kept = filt.add_many(["Reverse the word tiger.", "Reverse the word apple."], thresholds=[t["t"], t["t"]])
    assert [k for k, _ in kept] == [True, False]
    filt2 = NoveltyFilter(["Please reverse the word apple now, thanks."], threshold=0.7)
    score = float(filt2.scores("Reverse the word tiger now, thanks.").max())
    assert 0.7 < score <= 0.9
    assert filt2.add_many(["Reverse the word tiger now, thanks."], thresholds=[0.9])[0][0] is True
    assert filt2.add_many(["Please reverse the word apple now, thanks!"], thresholds=[0.9])[0][0] is False
    with pytest.raises(ValueError):
        filt2.add_many(["x y z"], thresholds=[0.5])  # below the filter's own threshold: not exact


@pytest.mark.parametrize(("lion", "key"), [
    ({"clusters": -1}, "lion.clusters"),
    ({"near_copy_rouge_l": 1.5}, "lion.near_copy_rouge_l"),
    ({"near_copy_rouge_l": 0.5}, "near_copy_rouge_l"),
    ({"hard_easy_ratio": "adaptiv"}, "lion.hard_easy_ratio"),
    ({"seed_weighting": "gap"}, "lion.seed_weighting"),
    ({"grouping": "embedding"}, "lion.grouping"),
    ({"novelty_scope": "type"}, "lion.novelty_scope"),
])
def test_bad_options_are_one_line_naming_them(tmp_path: Path, lion: dict, key: str) -> None:
    import yaml

    from lionkd.config import load_config
    from lionkd.errors import UserError

    path = tmp_path / "lion.yaml"
    path.write_text(yaml.safe_dump({"lion": lion}), encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_config(path)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_a_bad_option_exits_2(tmp_path: Path, cli) -> None:
    path = tmp_path / "lion.yaml"
    path.write_text("lion: {near_copy_rouge_l: 0.5}\n", encoding="utf-8")
    result = cli("config", "check", str(path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_our_options_validate_and_default_to_the_paper() -> None:
    cfg = RunConfig.model_validate({})
    assert (cfg.lion.selection, cfg.lion.seed_weighting, cfg.lion.hard_easy_ratio, cfg.lion.novelty_scope) == (
        "referee", "uniform", "1:1", "pool")
    ours = RunConfig.model_validate({"lion": {"seed_weighting": "progress", "hard_easy_ratio": "adaptive",
                                              "novelty_scope": "group", "grouping": "text", "clusters": 12}})
    assert ours.lion.hard_fraction == 0.5
