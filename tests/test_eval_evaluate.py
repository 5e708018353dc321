"""`lionkd eval` end to end: a local tiny model, a referee behind a local server, the CLI."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import sacrebleu
import torch

from lionkd.eval import metrics
from lionkd.eval.evaluate import EvalConfig, run_eval
from lionkd.llm.base import Backend, Choice, GenRequest, GenResult
from lionkd.llm.server import ServerThread, create_app
from lionkd.sandbox.student import build_student, save_student, train_tokenizer
from lionkd.store import Store

ROWS = [
    {"question": "Add 2 and 3.", "answer": "5", "kind": "math"},
    {"question": "Add 4 and 4.", "answer": "8", "kind": "math"},
    {"question": "Reverse the word cat.", "answer": "tac", "kind": "text"},
    {"question": "Uppercase the word dog.", "answer": "DOG", "kind": "text"},
    {"question": "Say nothing useful malformed.", "answer": "ok", "kind": "text"},
]
ANSWER = re.compile(r"\[Assistant (\d)\]\n(.*?)\n\[End of Assistant \1\]", re.DOTALL)
TARGETS = {r["answer"] for r in ROWS}


class TargetReferee(Backend):
    """8 for an answer that is one of the targets, 3 otherwise; no scores for "malformed" questions."""

    kind = "scripted"

    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        for i, req in enumerate(requests):
            text = req.message_dicts()[-1]["content"]
            if "malformed" in text.split("[Assistant 1]")[0]:
                reply = "No opinion."
            else:
                scores = {who: 8 if body.strip() in TARGETS else 3 for who, body in ANSWER.findall(text)}
                reply = f"Assistant 1: {scores['1']}\nAssistant 2: {scores['2']}\nbecause"
            yield i, GenResult([Choice(reply)], prompt_tokens=20, completion_tokens=6)


class Echo(Backend):
    """An endpoint model that answers with the question's last word."""

    kind = "scripted"

    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        for i, req in enumerate(requests):
            yield i, GenResult([Choice(req.message_dicts()[-1]["content"].split()[-1])], 5, 1)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tokenizer = train_tokenizer([r["question"] + " " + r["answer"] for r in ROWS] * 10, vocab_size=300)
    return save_student(build_student(tokenizer, "micro", seed=0), tokenizer, tmp_path_factory.mktemp("student"))


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def test_local_model_metrics_judge_and_speed(tmp_path: Path, student_dir: Path, data_file: Path) -> None:
    with ServerThread(create_app({"referee": TargetReferee("referee")})) as server:
        settings = EvalConfig(
            data=str(data_file), out_dir=tmp_path / "out", model=str(student_dir), input_column="question",
            target_column="answer", category_column="kind", max_new_tokens=4, batch_size=8,
            judge=True, referee_model="referee", referee_base_url=server.base_url,
            speed=True, teacher=str(student_dir), speed_new_tokens=2, speed_runs=1, memory_budget_gb=2.0, max_batch=2,
        )
        results = run_eval(settings)
        with Store.open_existing(settings.out_dir) as store:
            sent = sum(r["calls"] for r in store.usage())
        again = run_eval(settings)  # everything comes from the call cache
        with Store.open_existing(settings.out_dir) as store:
            assert sum(r["calls"] for r in store.usage()) == sent
    out = settings.out_dir
    saved = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert saved["examples"] == 5 and (out / "eval.md").is_file()
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    preds = [p["prediction"] for p in predictions]
    refs = [r["answer"] for r in ROWS]
    overall = saved["task_metrics"]["overall"]
    assert overall["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert overall["rouge_mean"] == pytest.approx(metrics.rouge(preds, refs)["rouge_mean"])
    assert overall["exact_match"] == pytest.approx(metrics.exact_match(preds, refs))
    assert overall["perplexity"] > 1
    assert set(saved["task_metrics"]["per_category"]) == {"math", "text"}
    assert saved["task_metrics"]["per_category"]["math"]["examples"] == 2
    judge = saved["judge"]
    cand = [8 if p.strip() in TARGETS else 3 for p in preds[:4]]
    assert judge["questions"] == 5 and judge["judged"] == 4 and judge["unparseable"] == 1
    assert judge["relative_score"] == pytest.approx(100 * sum(cand) / (8 * 4))
    assert judge["order_agreement"] == 1.0
    assert len((out / "judgements.jsonl").read_text(encoding="utf-8").splitlines()) == 5
    speed = saved["speed"]
    assert speed["student"]["parameters"] == speed["teacher"]["parameters"] > 0
    assert speed["ratios"]["parameters"] == 1.0 and speed["student"]["max_batch"] == 2
    assert again["judge"] == results["judge"] and again["task_metrics"] == results["task_metrics"]


def test_cli_eval_against_an_endpoint_and_report(tmp_path: Path, data_file: Path, cli) -> None:
    out = tmp_path / "out"
    with ServerThread(create_app({"echo": Echo("echo")})) as server:
        done = cli("eval", "--model", "echo", "--base-url", server.base_url, "--data", str(data_file),
                   "--input-column", "question", "--target-column", "answer", "--category-column", "kind",
                   "--metrics", "bleu,rouge,exact_match,perplexity", "--out", str(out))
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    preds = [r["question"].split()[-1] for r in ROWS]
    refs = [r["answer"] for r in ROWS]
    assert saved["task_metrics"]["overall"]["exact_match"] == pytest.approx(metrics.exact_match(preds, refs))
    assert "perplexity" not in saved["task_metrics"]["overall"]  # not available through an endpoint
    assert saved["endpoint"] == server.base_url
    shown = cli("report", str(out))
    assert shown.returncode == 0, shown.stderr
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Task metrics" in html and "candidate" in html


def test_cli_eval_user_errors(tmp_path: Path, data_file: Path, cli) -> None:
    missing = cli("eval", "--model", str(tmp_path / "nope"), "--data", str(data_file), "--out", str(tmp_path / "o"),
                  "--input-column", "question")
    assert missing.returncode == 2 and "no such model folder" in missing.stderr
    bad_column = cli("eval", "--model", "x", "--base-url", "http://127.0.0.1:9/v1", "--data", str(data_file),
                     "--input-column", "prompt", "--out", str(tmp_path / "o"))
    assert bad_column.returncode == 2 and "no column 'prompt'" in bad_column.stderr
    assert len(bad_column.stderr.strip().splitlines()) == 1


def test_eval_into_a_run_being_written_is_refused(tmp_path: Path, data_file: Path, cli) -> None:
    from lionkd.run_guard import hold_run

    run = tmp_path / "run"
    with hold_run(run):  # a `lionkd run` of that folder is going on
        result = cli("eval", "--model", "x", "--base-url", "http://127.0.0.1:9/v1", "--data", str(data_file),
                     "--input-column", "question", "--out", str(run))
    assert result.returncode == 2 and "another lionkd process" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (run / "run.sqlite").exists()
