"""The lm-evaluation-harness adapter: a clear error without it, the right call and tidy results with it."""

from __future__ import annotations

import sys
import types

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


def test_real_harness_task_on_a_tiny_model(tiny) -> None:
    pytest.importorskip("lm_eval")
    try:
        out = run_harness(*tiny, ["bbh_zeroshot_boolean_expressions"], batch_size=2, limit=2)
    except UserError as exc:
        pytest.skip(f"the task's data cannot be downloaded here: {exc}")
    assert "bbh_zeroshot_boolean_expressions" in out["results"]
