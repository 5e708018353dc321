"""The run report: built from a populated run store, read as HTML, and checked in headless Chromium where
it is installed (see report_checks.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lionkd.records import Instruction, Judgement, Response
from lionkd.report import hard_set
from lionkd.report.build import build_report
from lionkd.report.eval_tables import eval_markdown
from lionkd.store import Store
from report_checks import check_report, parse

SECRET = "sk-test-very-secret-value"
LION_FIGURES = {"referee-scores", "hard-ratio", "accuracy", "generation", "usage", "training-loss"}


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REPORT_TEST_KEY", SECRET)
    run = tmp_path / "run"
    config = {
        "run_dir": str(run),
        "teacher": {"backend": "openai", "model": "gpt-x", "api_key_env": "REPORT_TEST_KEY",
                    "base_url": f"http://example.invalid/{SECRET}", "price": {"input": 1.0, "output": 2.0}},
        "referee": {"backend": "openai", "model": "gpt-x", "api_key_env": "REPORT_TEST_KEY",
                    "price": {"input": 1.0, "output": 2.0}},
        "generator": {"backend": "openai", "model": "gpt-y", "api_key_env": "REPORT_TEST_KEY"},
        "lion": {"iterations": 3, "tau": 2.0},
    }
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with Store.open_run(run) as store:
        seeds = [Instruction(text=f"Add {i} and {i + 1}. <b>&</b>", domain="math" if i % 2 else "text")
                 for i in range(6)]
        store.add_instructions(seeds)
        ids = [s.id for s in seeds]
        store.set_pool(0, "train", ids)
        store.set_pool(0, "cache", ids)
        for it in range(3):
            new = [Instruction(text=f"Generated task {it}-{k} about sums", origin="generated", iteration=it,
                               mode="hard" if k % 2 else "easy", domain="math", parent_id=ids[k]) for k in range(2)]
            store.add_instructions(new)
            ids += [n.id for n in new]
            store.set_pool(it + 1, "train", [n.id for n in new])
            store.set_pool(it + 1, "cache", ids)
            for k, iid in enumerate(ids[:4]):
                store.add_response(Response(iid, "teacher", "gpt-x", it, f"teacher answer {k}"))
                store.add_response(Response(iid, "student", "tiny", it, f"student answer {k} </td>",
                                            finish_reason="length" if k == 3 else "stop"))
                lost = it == 1 and k == 2  # no readable verdict: left out of the split
                store.add_judgement(Judgement(iid, it, "Assistant 1: 8\nAssistant 2: 5", "Assistant 1: 6\n"
                                              "Assistant 2: 8", None if lost else (8.0, 8.0),
                                              None if lost else (5.0 + it + 2 * (k % 2), 6.0), parse_failures=k % 2,
                                              error="unreadable" if lost else None))
            store.put_metrics(it, {
                "hard_ratio": 0.5 - 0.1 * it, "score_gap": 2.0 - 0.5 * it, "teacher_mean": 8.0,
                "student_mean": 6.0 + 0.5 * it, "order_agreement": 0.9, "novelty_rejections": 3 - it,
                "parse_failures": it, "accuracy": {"math": 0.2 + 0.1 * it, "text": 0.5 + 0.05 * it},
                "note": "free text", "teacher_score": 8.0, "student_score": 6.0 + 0.5 * it,
                "generator_calls": 10, "new_hard": 1, "new_easy": 1, "filter_rejections": {"too_short": 1},
                "usage_referee": {"calls": 8, "prompt_tokens": 800},
            })
            for role, model, n in (("teacher", "gpt-x", 10), ("referee", "gpt-x", 8), ("generator", "gpt-y", 2)):
                for c in range(n):
                    store.put_call(f"{role}-{it}-{c}", backend="openai", model=model, request={"c": c},
                                   result={"text": "x"}, prompt_tokens=100, completion_tokens=50, role=role,
                                   iteration=it)
            store.put_failure("f", backend="openai", model="gpt-x", error="timeout", role="referee", iteration=it)
            for stage in ("imitation", "discrimination", "generation"):
                store.finish_stage(it, stage, {"items": 4})
            student = run / "students" / f"iter-{it + 1}"  # trained in the imitation of iteration it + 1
            student.mkdir(parents=True)
            (student / "train_metrics.json").write_text(json.dumps(
                {"loss": 2.0 - it, "steps": 4, "loss_history": [[s, 3.0 - it - 0.2 * s] for s in range(1, 5)]}))
        store.finish_stage(3, "imitation", {"items": 2})  # the last imitation: the final student
    (run / "eval-final").mkdir()
    results = {
        "model": "runs/student", "examples": 4,
        "task_metrics": {"overall": {"bleu": 12.5, "rouge1": 40.0, "exact_match": 25.0},
                         "per_category": {"math": {"examples": 2, "bleu": 10.0, "rouge1": 30.0, "exact_match": 0.0}}},
        "judge": {"questions": 4, "judged": 3, "unparseable": 1, "parse_failures": 3, "relative_score": 87.5,
                  "candidate_mean": 7.0, "reference_mean": 8.0, "wins": 1, "ties": 0, "losses": 2,
                  "order_agreement": 2 / 3,
                  "per_category": {"math": {"relative_score": 80.0, "judged": 2},
                                   "text": {"relative_score": 100.0, "judged": 1}}},
    }
    (run / "eval-final" / "eval.json").write_text(json.dumps(results), encoding="utf-8")
    return run


def test_report_reads_headline_first_then_plots_hard_set_and_metrics(run_dir: Path) -> None:
    html_path, md_path = build_report(run_dir)
    text = html_path.read_text(encoding="utf-8")
    page = parse(html_path)
    assert page.h2[:3] == ["Headline", "At a glance", "The hard set"] and page.h2[-1] == "All recorded metrics"
    assert {f"fig-{f}" for f in LION_FIGURES} <= set(page.ids)
    headline = text[text.index('id="headline"'):text.index('id="plots"')]
    assert f"{run_dir / 'students' / 'iter-3'}" in headline
    assert "50.0% -&gt; 30.0%" in headline  # hard ratio, first and last iteration
    assert "math" not in headline and "0.006" in headline  # teacher: 30 x (100 in, 50 out) at $1 / $2 per 1M
    for warning in ("unreadable referee replies", "1 instructions left out", "student answers cut off by max_tokens",
                    "failed calls"):
        assert warning in headline, warning
    # the hard set: every judged instruction with both answers and replies; hard / easy / excluded as tau says
    rows = page.rows["judged"]
    assert len(rows) == 12 and {r["data-group"] for r in rows} == {"hard", "easy", "excluded"}
    assert {r["data-gap"] for r in rows if r["data-group"] == "hard"} == {"2.5", "2"}
    assert "teacher answer 0" in text and "Assistant 2: 8" in text and "cut off by max_tokens" in text
    generated = page.rows["generated"]
    assert len(generated) == 6 and {r["data-group"] for r in generated} == {"hard", "easy"}
    full = [json.loads(line) for line in (run_dir / hard_set.JUDGED_JSONL).read_text().splitlines()]
    assert len(full) == 12 and all(r["teacher_answer"] and r["referee_student_first"] for r in full)
    kids = [json.loads(line) for line in (run_dir / hard_set.GENERATED_JSONL).read_text().splitlines()]
    assert all(k["parent"].startswith("Add ") and k["mode"] in ("hard", "easy") for k in kids)
    assert f'href="{hard_set.JUDGED_JSONL}"' in text
    # the raw metrics read as words, mappings one key per row, an empty mapping as "none"
    metrics = text[text.index('id="metrics"'):]
    assert "referee: tokens in" in metrics and "accuracy: math" in metrics and "usage_referee" not in metrics
    # user text escaped, secrets masked
    assert "<b>&</b>" not in text and "&lt;b&gt;&amp;&lt;/b&gt;" in text
    md = md_path.read_text(encoding="utf-8")
    assert SECRET not in text and SECRET not in md
    assert md.index("## Headline") < md.index("## The hard set") < md.index("## All recorded metrics")
    for line in md.splitlines():
        if line.startswith("!["):
            assert (run_dir / line.split("](")[1].rstrip(")")).is_file()


def test_big_runs_embed_a_sample_and_say_so(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hard_set, "CAP_PER_ITERATION", 3)
    html_path, _ = build_report(run_dir)
    page = parse(html_path)
    assert len(page.rows["judged"]) == 9  # 3 of 4 per iteration
    assert "3 judged instructions per iteration are shown" in html_path.read_text(encoding="utf-8")
    assert len((run_dir / hard_set.JUDGED_JSONL).read_text().splitlines()) == 12


def test_report_of_a_bare_store_still_renders(tmp_path: Path) -> None:
    Store.open_run(tmp_path).close()
    html_path, _ = build_report(tmp_path)
    page = parse(html_path)
    assert "usage" in page.ids and page.images == [] and page.h2[0] == "Headline"


def test_eval_markdown_lists_metrics() -> None:
    md = eval_markdown({"examples": 2, "task_metrics": {"overall": {"bleu": 1.5}}, "judge": {"relative_score": 90.0}})
    assert "| all | 2 | 1.5 |" in md and "90" in md


def test_report_works_in_a_browser(run_dir: Path, tmp_path: Path) -> None:
    """Headline on the first screen, plots loaded and not blank, filters and sort clicked, no console error
    (in Chromium where installed; otherwise the parsed-HTML checks only)."""
    html_path, _ = build_report(run_dir)
    check_report(html_path, tmp_path / "profile", LION_FIGURES)
