"""The on-policy benchmark's own arithmetic: its arms' runs are far too long for tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "on_policy.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # a benchmark imports its shared helpers as `_common`
    spec = importlib.util.spec_from_file_location("on_policy_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(arm, seed, accuracy, tokens, half_accuracy, half_tokens, peak=1000.0):
    return {"arm": arm, "seed": seed, "accuracy": accuracy, "teacher_tokens": tokens, "wall_s": 10.0,
            "peak_mb": peak, "half": {"accuracy": half_accuracy, "teacher_tokens": half_tokens}}


def _rows(on_policy_half: float, trl_peak: float):
    rows = []
    for seed in range(3):
        rows += [{"arm": "teacher", "seed": seed, "accuracy": 0.8},
                 _row("sft", seed, 0.30 + 0.01 * seed, 1000, 0.2, 500),
                 _row("on_policy", seed, 0.40, 1000, on_policy_half + 0.01 * seed, 480, peak=900.0),
                 _row("mixed", seed, 0.35, 1000, 0.25, 500),
                 _row("trl_gkd", seed, 0.38 - 0.01 * seed, 1200, 0.3, 600, peak=trl_peak)]
    return rows


def test_the_aims_are_read_off_paired_seeds(bench):
    s = bench.summarise(_rows(on_policy_half=0.31, trl_peak=1500.0))
    assert s["seeds_done"] == [0, 1, 2]
    assert s["teacher_accuracy"]["mean"] == pytest.approx(0.8)
    half = s["aims"]["on_policy at half its steps - sft final"]
    assert half["accuracy"]["per_seed"] == pytest.approx([0.01, 0.01, 0.01])
    assert half["teacher_token_ratio"]["mean"] == pytest.approx(0.48)
    assert half["met"]
    assert not s["aims"]["mixed at half its steps - sft final"]["met"]  # 0.25 at half < SFT's final ~0.31
    trl = s["aims"]["on_policy - trl_gkd at equal steps"]
    assert trl["accuracy"]["per_seed"] == pytest.approx([0.02, 0.03, 0.04])
    assert trl["peak_memory_ratio"]["mean"] == pytest.approx(0.6)
    assert trl["met"]
    md = bench.markdown(bench.settings(False) | {"quick": False}, s, 120.0, "CPU (2 cores)")
    assert "on_policy at half its steps - sft final: accuracy +0.010" in md and ": met." in md


def test_an_aim_missed_says_so(bench):
    s = bench.summarise(_rows(on_policy_half=0.2, trl_peak=800.0))
    assert not s["aims"]["on_policy at half its steps - sft final"]["met"]
    assert not s["aims"]["on_policy - trl_gkd at equal steps"]["met"]  # more memory than TRL
    assert "not met" in bench.markdown(bench.settings(True) | {"quick": True}, s, 1.0, "CPU")


def test_only_seeds_with_every_arm_count(bench):
    rows = [r for r in _rows(0.31, 1500.0) if not (r["seed"] == 2 and r["arm"] == "mixed")]
    s = bench.summarise(rows)
    assert s["seeds_done"] == [0, 1]
    assert bench.summarise([])["seeds_done"] == []
    assert "No seed has finished" in bench.markdown(bench.settings(True) | {"quick": True}, bench.summarise([]),
                                                    1.0, "CPU")
