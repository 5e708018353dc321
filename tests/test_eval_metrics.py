"""Task metrics equal the reference libraries' numbers; perplexity equals the model's own loss."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from transformers import T5Config, T5ForConditionalGeneration

from lionkd.errors import UserError
from lionkd.eval import metrics
from lionkd.kd.examples import TrainExample
from lionkd.sandbox.student import build_student, train_tokenizer

PREDICTIONS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog",
    "Results were reported in 2023 by the team.",
    "completely unrelated words here",
]
REFERENCES = [
    "The cat is sitting on the mat.",
    "The quick brown fox jumped over the lazy dogs.",
    "The team reported the results in 2023.",
    "Nothing in common at all",
]


def test_bleu_equals_sacrebleu() -> None:
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert metrics.bleu(PREDICTIONS, REFERENCES) == pytest.approx(expected)
    assert 0 < expected < 100


def test_bleu_with_several_references_per_example() -> None:
    alternatives = [[r, r.upper()] for r in REFERENCES]
    alternatives[0] = [REFERENCES[0]]  # a different number of references per example
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES, [None, *(a[1] for a in alternatives[1:])]]).score
    assert metrics.bleu(PREDICTIONS, alternatives) == pytest.approx(expected)


@pytest.mark.parametrize("stem", [True, False])
def test_rouge_equals_rouge_score(stem: bool) -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
    per_example = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
    expected = {k: 100 * sum(s[k].fmeasure for s in per_example) / len(per_example) for k in ("rouge1", "rouge2", "rougeL")}
    got = metrics.rouge(PREDICTIONS, REFERENCES, use_stemmer=stem)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value)
    assert got["rouge_mean"] == pytest.approx(sum(expected.values()) / 3)
    assert got["rouge1"] > got["rouge2"] > 0


def test_exact_match_normalises() -> None:
    assert metrics.normalise_answer("  The Answer: 42! ") == "answer 42"
    preds = ["The answer is 42.", "paris", "an apple", "no"]
    refs = ["answer is 42", "Paris!", "apple", "yes"]
    assert metrics.exact_match(preds, refs) == 75.0
    with pytest.raises(ValueError):
        metrics.exact_match(preds, refs[:2])


def test_text_metrics_combines_and_bertscore_is_optional() -> None:
    out = metrics.text_metrics(PREDICTIONS, REFERENCES)
    assert set(out) == {"bleu", "rouge1", "rouge2", "rougeL", "rouge_mean", "exact_match"}
    try:
        import bert_score  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="bert-score"):
            metrics.text_metrics(PREDICTIONS, REFERENCES, names=["bertscore"])


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([*PREDICTIONS, *REFERENCES] * 5, vocab_size=300)


def _examples() -> list[TrainExample]:
    return [TrainExample(target=r, prompt=f"Rewrite: {p}") for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]


def test_perplexity_of_a_causal_model_is_its_masked_loss(tokenizer) -> None:
    model = build_student(tokenizer, "micro", seed=1)
    total, count = 0.0, 0
    for ex in _examples():
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=False,
                                               add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p_ids + t_ids])
        labels = ids.clone()
        labels[0, : len(p_ids)] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        total += loss * len(t_ids)
        count += len(t_ids)
    expected = math.exp(total / count)
    got = metrics.target_perplexity(model, tokenizer, _examples(), template="chat", batch_size=3)
    assert got == pytest.approx(expected, rel=1e-4)
    assert 1 < got < 2 * len(tokenizer)


def test_perplexity_of_an_encoder_decoder_model(tokenizer) -> None:
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=2,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    model = T5ForConditionalGeneration(config).eval()  # no dropout in the reference numbers
    total, count = 0.0, 0
    for ex in _examples():
        src = torch.tensor([tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]])
        tgt = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            loss = model(input_ids=src, labels=torch.tensor([tgt])).loss.item()
        total += loss * len(tgt)
        count += len(tgt)
    got = metrics.target_perplexity(model, tokenizer, _examples(), batch_size=2)
    assert got == pytest.approx(math.exp(total / count), rel=1e-4)
