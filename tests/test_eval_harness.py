"""The lm-evaluation-harness adapter: a clear error without it, the right call and tidy results with it."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from lionkd.errors import UserError
from lionkd.eval.harness import clean_metrics, run_harness
from lionkd.sandbox.student import build_student, train_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = train_tokenizer(["the answer is yes or no depending on the question"] * 10, vocab_size=300)
    return build_student(tokenizer, "micro"), tokenizer


def test_without_lm_eval_the_error_says_what_to_install(monkeypatch, tiny) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'lionkd\[eval\]'"):
        run_harness(*tiny, ["bbh_zeroshot"])


def test_adapter_passes_the_model_and_tidies_results(monkeypatch, tiny) -> None:
    calls: dict = {}

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["wrapped"] = (pretrained, tokenizer, batch_size)

    def simple_evaluate(**kwargs):
        calls["evaluate"] = kwargs
        return {"results": {
            "bbh_zeroshot": {"alias": "bbh", "exact_match,get-answer": 0.25, "exact_match_stderr,get-answer": "N/A"},
            "agieval_en": {"alias": "agieval", "acc,none": 0.3, "acc_stderr,none": 0.01},
        }, "versions": {"bbh_zeroshot": 3.0}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = FakeHFLM
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    model, tokenizer = tiny
    out = run_harness(model, tokenizer, ["bbh_zeroshot", " agieval_en", ""], batch_size=4, limit=5)
    assert calls["wrapped"] == (model, tokenizer, 4)
    assert calls["evaluate"]["tasks"] == ["bbh_zeroshot", "agieval_en"] and calls["evaluate"]["limit"] == 5
    assert calls["evaluate"]["num_fewshot"] is None  # zero-shot, as the Lion paper evaluates
    assert out["results"] == {"bbh_zeroshot": {"exact_match[get-answer]": 0.25},
                              "agieval_en": {"acc": 0.3, "acc_stderr": 0.01}}
    assert out["tasks"] == ["bbh_zeroshot", "agieval_en"]

    def failing(**kwargs):
        raise ValueError("Tasks not found: bbh_typo")

    fake.simple_evaluate = failing
    with pytest.raises(UserError, match="Tasks not found: bbh_typo"):
        run_harness(model, tokenizer, ["bbh_typo"])


def test_clean_metrics_keeps_numbers_only() -> None:
    assert clean_metrics({"alias": "x", "acc,none": 1, "f1,strict": 0.5, "flag": True}) == {"acc": 1.0, "f1[strict]": 0.5}


LOCAL_TASK = """task: lionkd_local_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def local_task(folder: Path, rows: int) -> Path:
    """A harness task of one's own: a YAML file over a JSONL file, no hub involved."""
    folder.mkdir()
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"question": f"is {i} even?", "choices": [" yes", " no"], "answer": i % 2}) + "\n"
                            for i in range(rows)))
    (folder / "lionkd_local_qa.yaml").write_text(LOCAL_TASK.format(data=data))
    return folder


def test_real_harness_runs_a_local_task_end_to_end(tmp_path: Path, cli) -> None:
    tasks = local_task(tmp_path / "tasks", rows=6)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input": f"Add {i} and 1.", "target": str(i + 1)}) + "\n" for i in range(2)))
    out = tmp_path / "eval"
    result = cli("eval", "--model", "sandbox:base-student", "--data", str(data), "-o", str(out), "--metrics",
                 "exact_match", "--max-new-tokens", "4", "--harness-tasks", "lionkd_local_qa",
                 "--harness-include", str(tasks), env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    harness = json.loads((out / "eval.json").read_text())["harness"]
    assert harness["samples"]["lionkd_local_qa"] == {"original": 6, "effective": 6}
    assert 0.0 <= harness["results"]["lionkd_local_qa"]["acc"] <= 1.0


def test_a_missing_task_folder_is_one_line(tiny, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--harness-include .*no such folder"):
        run_harness(*tiny, ["lionkd_local_qa"], include_path=tmp_path / "absent")
