"""The demo end to end, shortened: the sandbox world over HTTP, the shipped base student, a report."""

import json
import re

from conftest import run_cli
from lionkd.store import Store
from report_checks import check_report


def test_short_demo_runs_end_to_end_and_resumes(tmp_path):
    run = tmp_path / "demo"
    args = ("demo", "--run-dir", str(run), "--student", "tiny", "--iterations", "2", "--seeds", "120", "--new", "60",
            "--epochs", "1", "--test-per-task", "10", "--no-progress")
    result = run_cli(*args, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "overall" in result.stdout and "iter-3" in result.stdout
    report = re.search(r"report: (\S+)", result.stdout)
    assert report and (run / "report.html").is_file() and report.group(1).endswith("report.html")
    # the demo's report, in headless Chromium where installed: headline, every plot, the hard-set filters
    timings = check_report(run / "report.html", tmp_path / "profile",
                           {"referee-scores", "hard-ratio", "accuracy", "generation", "usage", "training-loss"})
    print(f"report: {(run / 'report.html').stat().st_size} bytes; browser checks: {timings}")

    with Store.open_existing(run) as store:
        seeds = store.pool(1, "cache")
        assert len(seeds) == 120 and store.pool(1, "train") == seeds
        for k in (2, 3):
            new = store.pool(k, "train")
            assert 0 < len(new) <= 60
            assert store.pool(k, "cache") == store.pool(k - 1, "cache") + new  # the Cache Pool grows by them
            generated = store.instructions(new)
            assert all(i.origin == "generated" and i.iteration == k - 1 and i.mode in ("hard", "easy")
                       and i.parent_id in store.pool(k - 1, "cache") for i in generated)
        metrics = store.metrics()
        assert set(metrics[0]["accuracy"]) == {"overall", "arithmetic", "lists", "logic", "words"}
        assert all("accuracy" in metrics[k] for k in (1, 2, 3))
        assert 0 <= metrics[1]["hard_ratio"] <= 1
        calls = sum(row["calls"] for row in store.usage())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["student"] == "sandbox:base-student" and summary["wall_s"] > 0
    accuracy = summary["accuracy"]
    assert accuracy["per_iteration"] == [metrics[k]["accuracy"]["overall"] for k in range(4)]
    assert accuracy["base"] == accuracy["per_iteration"][0] and accuracy["final"] == accuracy["per_iteration"][-1]
    assert accuracy["per_domain"]["words"] == [metrics[k]["accuracy"]["words"] for k in range(4)]

    again = run_cli(*args, timeout=240)  # a finished demo reruns from its store: no call is sent again
    assert again.returncode == 0, again.stderr[-3000:]
    with Store.open_existing(run) as store:
        assert sum(row["calls"] for row in store.usage()) == calls
