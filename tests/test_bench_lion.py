"""The decisive Lion benchmark's own arithmetic and option checks (its runs are far too long for tests)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "lion_vs_self_instruct.py"


def _bench():
    sys.path.insert(0, str(SCRIPT.parent))  # a benchmark imports its shared helpers as `_common`
    spec = importlib.util.spec_from_file_location("lion_vs_self_instruct", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_paired_interval_is_a_t_interval() -> None:
    bench = _bench()
    r = bench.interval([0.01, 0.03, 0.05, 0.02, 0.04])
    assert r["mean"] == pytest.approx(0.03)
    half = 2.776 * r["std"] / 5 ** 0.5  # t(0.975, 4 degrees of freedom)
    assert r["ci95"] == pytest.approx([0.03 - half, 0.03 + half])
    assert bench.interval([0.2])["ci95"] is None


def test_balanced_and_seed_weighted_accuracy() -> None:
    bench = _bench()
    tasks = [t for d in bench.DOMAINS.values() for t in d]
    acc = {"by_task": {t: 1.0 if t == tasks[0] else 0.0 for t in tasks}}
    cols = bench.columns_of(acc, rare=[tasks[-1]], shares={tasks[0]: 0.5, tasks[1]: 0.5})
    assert cols["overall"] == pytest.approx(1 / len(tasks))
    assert cols["overall (seed-weighted)"] == pytest.approx(0.5)
    assert cols["rare types"] == 0.0


def test_bands_say_where_each_arm_spent_its_new_instructions() -> None:
    bench = _bench()

    def task(imitation: float, kept: dict[str, float], acc: dict[str, float]) -> dict:
        return {"accuracy": {"imitation": imitation, **acc}, **{a: {"kept": kept[a]} for a in bench.GEN_ARMS}}

    even = dict.fromkeys(bench.GEN_ARMS, 1.0)
    per_task = {
        "a": task(0.05, {"self-instruct": 1.0, "lion": 6.0, "ours": 0.0}, {"self-instruct": 0.05, "lion": 0.15, "ours": 0.05}),
        "b": task(0.5, {"self-instruct": 2.0, "lion": 2.0, "ours": 8.0}, {"self-instruct": 0.6, "lion": 0.55, "ours": 0.8}),
        "c": task(0.9, {"self-instruct": 7.0, "lion": 2.0, "ours": 2.0}, even | {"self-instruct": 0.95}),
    }
    b = bench.bands(per_task)
    assert [b[n]["types"] for n in ("low", "mid", "high")] == [["a"], ["b"], ["c"]]
    assert b["low"]["lion"]["kept_share"] == pytest.approx(0.6)
    assert b["mid"]["ours"]["kept_share"] == pytest.approx(0.8)
    assert b["mid"]["ours"]["gain"] == pytest.approx(0.3)
    assert b["high"]["self-instruct"]["gain"] == pytest.approx(0.05)
    assert sum(b[n]["self-instruct"]["kept_share"] for n in b) == pytest.approx(1.0)


def test_choice_distances_and_levels() -> None:
    from collections import Counter

    bench = _bench()
    a, b = Counter(add=30, sort=10), Counter(add=10, sort=30)
    assert bench.total_variation(a, a) == 0.0
    assert bench.total_variation(a, b) == pytest.approx(0.5)
    assert bench.total_variation(Counter(add=1), Counter(sort=1)) == 1.0
    chance = bench.chance_variation(a, b)
    assert 0.0 < chance < 0.3  # two draws of 40 from one mix differ a little, never like disjoint mixes
    assert chance == bench.chance_variation(a, b)  # seeded
    levels = Counter({"1": 2, "4": 1, "5": 1, "None": 3})
    assert bench.mean_level(levels) == pytest.approx(2.75)
    assert bench.share_at_least(levels, 4) == pytest.approx(0.5)


@pytest.mark.parametrize(("args", "named"), [
    (["--seeds", "0"], "--seeds"), (["--zipf", "-1"], "--zipf"), (["--seed-pool", "x"], "--seed-pool"),
])
def test_options_out_of_range_are_one_line_and_exit_2(args: list[str], named: str) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and named in result.stderr
