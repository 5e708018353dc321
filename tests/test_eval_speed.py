"""Size and speed on a tiny model: few tokens, small batches, small budgets."""

from __future__ import annotations

import statistics

import pytest
import torch

from lionkd.eval.speed import measure_speed, speed_ratios
from lionkd.sandbox.student import build_student, train_tokenizer

NEW_TOKENS = 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["why is the sky blue at noon and red at sunset"] * 20, vocab_size=300)


@pytest.fixture
def eager_eos_model(tokenizer):
    """A model that wants to stop at once: greedy decoding would emit EOS first."""
    model = build_student(tokenizer, "micro", seed=0)
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= 200
    return model


def _record_generate(model):
    lengths: list[tuple[int, int, int]] = []  # (batch, input length, output length)
    original = model.generate

    def generate(**kwargs):
        out = original(**kwargs)
        lengths.append((out.shape[0], kwargs["input_ids"].shape[1], out.shape[1]))
        return out

    model.generate = generate
    return lengths


def test_speed_doubles_the_batch_within_the_budget(tokenizer, eager_eos_model) -> None:
    lengths = _record_generate(eager_eos_model)
    result = measure_speed(eager_eos_model, tokenizer, new_tokens=NEW_TOKENS, runs=3, budget_gb=2.0, max_batch=4)
    assert result.parameters == sum(p.numel() for p in eager_eos_model.parameters())
    assert len(result.latency_runs_s) == 3 and result.latency_s == statistics.median(result.latency_runs_s)
    assert [t.batch_size for t in result.trials] == [1, 2, 4] and all(t.fits for t in result.trials)
    assert result.max_batch == 4
    assert result.throughput_per_min == pytest.approx(4 * 60 / result.trials[-1].seconds)
    assert result.peak_memory_mb >= result.weights_mb > 0
    # every call made exactly NEW_TOKENS tokens although EOS is the model's first choice
    assert {out - inp for _, inp, out in lengths} == {NEW_TOKENS}
    assert [b for b, _, _ in lengths] == [1, 1, 1, 1, 1, 2, 4]  # warm-up, 3 timed runs, then the batches


def test_speed_stops_when_over_the_budget(tokenizer, eager_eos_model) -> None:
    result = measure_speed(eager_eos_model, tokenizer, new_tokens=NEW_TOKENS, runs=1, budget_gb=1e-6, max_batch=8)
    assert result.max_batch == 0 and result.throughput_per_min is None
    assert len(result.trials) == 1 and not result.trials[0].fits and "budget" in result.trials[0].note


def test_speed_stops_at_out_of_memory(tokenizer, eager_eos_model) -> None:
    original = eager_eos_model.generate

    def generate(**kwargs):
        if kwargs["input_ids"].shape[0] >= 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(**kwargs)

    eager_eos_model.generate = generate
    result = measure_speed(eager_eos_model, tokenizer, new_tokens=NEW_TOKENS, runs=1, budget_gb=2.0, max_batch=16)
    assert [t.batch_size for t in result.trials] == [1, 2, 4]
    assert result.trials[-1].note == "out of memory" and result.max_batch == 2


def test_ratios_against_a_larger_teacher(tokenizer) -> None:
    student = build_student(tokenizer, "micro", seed=0)
    teacher = build_student(tokenizer, "tiny", seed=0)
    s = measure_speed(student, tokenizer, new_tokens=NEW_TOKENS, runs=1, budget_gb=2.0, max_batch=2)
    t = measure_speed(teacher, tokenizer, new_tokens=NEW_TOKENS, runs=1, budget_gb=2.0, max_batch=2)
    ratios = speed_ratios(s, t)
    assert ratios["parameters"] == pytest.approx(s.parameters / t.parameters) and ratios["parameters"] < 0.5
    assert ratios["latency"] == pytest.approx(s.latency_s / t.latency_s)
    assert ratios["speedup"] == pytest.approx(t.latency_s / s.latency_s)
    assert ratios["throughput"] == pytest.approx(s.throughput_per_min / t.throughput_per_min)
