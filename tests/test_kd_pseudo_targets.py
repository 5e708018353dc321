"""Pseudo-targets, their schedule, cached teacher top-k, and Joint-Teaching with student samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lionkd.config import TrainConfig
from lionkd.kd.decoding import generate_token_ids
from lionkd.kd.examples import Collator, TrainExample, encode_example
from lionkd.kd.job import TrainJob
from lionkd.kd.joint_teaching import JointTeaching, StudentSampler
from lionkd.kd.losses import kd_loss, sparse_kd_loss
from lionkd.kd.pseudo_targets import (
    PTConfig,
    cache_teacher_topk,
    generate_pseudo_targets,
    pt_schedule,
    records_to_dataset,
)
from lionkd.kd.train import train_student
from test_kd_trainer import examples, tiny_llama, tiny_t5, tiny_tokenizer


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_batched_generation_strips_prompt_and_matches_unbatched(family: str) -> None:
    tok = tiny_tokenizer()
    model = tiny_llama(seed=2) if family == "llama" else tiny_t5(seed=2)
    prompts = [tok(x)["input_ids"] for x in ("the cat", "what did the big dog do on the mat", "red")]
    batched = generate_token_ids(model, tok, prompts, do_sample=False, max_new_tokens=6)
    for prompt, got in zip(prompts, batched, strict=True):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        new = out[0, 1:] if family == "t5" else out[0, len(prompt):]
        expected = []
        for t in new.tolist():
            expected.append(t)
            if t == tok.eos_token_id:
                break
        assert got == [expected]


def test_pseudo_targets_records_and_methods() -> None:
    tok = tiny_tokenizer()
    teacher = tiny_llama(seed=4)
    inputs = examples(3)
    sampled = generate_pseudo_targets(teacher, tok, inputs, PTConfig(method="sample", k=3, max_new_tokens=5),
                                      template="alpaca", teacher_name="tiny")
    assert len(sampled) == 9 and len({r["id"] for r in sampled}) == 9
    assert [r["k"] for r in sampled[:3]] == [0, 1, 2]
    assert all(r["teacher"] == "tiny" and r["method"] == "sample" and r["params"]["top_p"] == 0.95 for r in sampled)
    hot = generate_pseudo_targets(teacher, tok, inputs, PTConfig(method="high_temp", k=2, max_new_tokens=5),
                                  template="alpaca")
    assert hot[0]["params"]["temperature"] == 1.5
    beams = generate_pseudo_targets(teacher, tok, inputs[:1], PTConfig(method="beam", k=2, max_new_tokens=5),
                                    template="alpaca")
    assert len(beams) == 2 and beams[0]["params"]["num_beams"] == 4 and not beams[0]["params"]["do_sample"]
    # the same settings and seed give the same PTs
    again = generate_pseudo_targets(teacher, tok, inputs, PTConfig(method="sample", k=3, max_new_tokens=5),
                                    template="alpaca", teacher_name="tiny")
    assert [r["target"] for r in again] == [r["target"] for r in sampled]
    assert len(records_to_dataset(sampled)) == 9


def test_schedule_uses_pt_e_mod_k_with_gold() -> None:
    gold = [TrainExample(prompt="a", target="gold")]
    records = [
        {"input_id": inp, "k": k, "target": f"{inp}-{k}", "prompt": inp, "messages": None}
        for inp in ("x", "y") for k in range(3)
    ]
    lists = pt_schedule(gold, records)
    assert len(lists) == 3
    for e, lst in enumerate(lists):
        assert [x.target for x in lst] == ["gold", f"x-{e}", f"y-{e}"]
        assert [x.source for x in lst] == ["gold", "pt", "pt"]


def test_schedule_trains_epoch_lists_in_turn(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    lists = [[TrainExample(prompt="the cat", target=t)] * 4 for t in ("one", "two")]
    seen: list[str] = []
    from lionkd.kd import trainer as trainer_mod

    original = trainer_mod.KDTrainer.compute_loss

    def spy(self, model, inputs, **kw):  # noqa: ANN001
        seen.append(tok.decode(inputs["features"][0]["target"], skip_special_tokens=True))
        return original(self, model, inputs, **kw)

    trainer_mod.KDTrainer.compute_loss = spy
    try:
        train_student(TrainJob(tiny_llama(), lists, tmp_path / "s", settings=TrainConfig(epochs=3, batch_size=4, max_length=16),
                               tokenizer=tok, template="alpaca", progress=False))
    finally:
        trainer_mod.KDTrainer.compute_loss = original
    assert seen == ["one", "two", "one"]


def test_cached_topk_matches_teacher_and_trains_without_teacher(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    teacher = tiny_llama(seed=4)
    data = examples(4)
    cached = cache_teacher_topk(teacher, tok, data, k=64, template="alpaca", max_length=32)
    feats = [encode_example(tok, e, template="alpaca", max_length=32) for e in cached]
    batch = Collator(pad_token_id=tok.pad_token_id)(feats)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_logits = torch.randn_like(t_logits)
    dense = kd_loss(s_logits, t_logits, batch["target_mask"])
    sparse = sparse_kd_loss(s_logits, batch["topk_ids"], batch["topk_logprobs"], batch["target_mask"])
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)  # k = V: the cache is exact

    small = cache_teacher_topk(teacher, tok, data, k=8, template="alpaca", max_length=32)
    metrics = train_student(TrainJob(tiny_llama(), small, tmp_path / "c", settings=TrainConfig(max_steps=2, batch_size=4,
                                     max_length=32), objective="logits", tokenizer=tok, template="alpaca", progress=False))
    assert metrics["last_losses"]["logits"] > 0


def test_student_sampler_uses_eval_mode_and_caches() -> None:
    tok = tiny_tokenizer()
    model = tiny_llama()
    model.train()
    modes: list[bool] = []
    model.model.register_forward_hook(lambda m, i, o: modes.append(m.training))
    feats = [encode_example(tok, e, template="alpaca") for e in examples(4)]
    sampler = StudentSampler(JointTeaching(alpha=1.0, refresh_every=5, max_new_tokens=4), tok, 64, False)
    mixed = sampler.mix(model, feats, step=0)
    assert modes and not any(modes) and model.training
    assert all(f["source"] == "student" and f["prompt"] == g["prompt"] for f, g in zip(mixed, feats, strict=True))
    assert all(1 <= len(f["target"]) <= 4 for f in mixed)
    sampler.mix(model, feats, step=3)  # within refresh_every: reuse
    assert sampler.generated == 4
    sampler.mix(model, feats, step=5)
    assert sampler.generated == 8
    half = StudentSampler(JointTeaching(alpha=0.5, seed=1), tok, 64, False)
    replaced = sum(f.get("source") == "student" for _ in range(20) for f in half.mix(model, feats, step=_))
    assert 20 < replaced < 60  # about half of 80


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_joint_teaching_trains(tmp_path: Path, family: str) -> None:
    tok = tiny_tokenizer()
    student = tiny_llama() if family == "llama" else tiny_t5()
    teacher = tiny_llama(seed=4) if family == "llama" else tiny_t5(seed=4)
    joint = JointTeaching(alpha=0.5, max_new_tokens=6)
    metrics = train_student(TrainJob(student, examples(8), tmp_path / family, settings=TrainConfig(max_steps=4, batch_size=4,
                                     max_length=32), teacher=teacher, objective="logits", joint=joint, tokenizer=tok,
                                     template="alpaca", progress=False))
    assert metrics["student_samples"]["replaced"] > 0
    assert metrics["steps"] == 4 and metrics["last_losses"]["logits"] > 0


@pytest.mark.parametrize("fused", [True, False])
def test_joint_teaching_has_no_cross_entropy_on_student_samples(tmp_path: Path, fused: bool) -> None:
    """Cross-entropy on the student's own samples would be self-training: "ce" sees gold and teacher PTs only."""
    from lionkd.kd import train as trainer_module

    tok = tiny_tokenizer()
    settings = TrainConfig(max_steps=2, batch_size=4, max_length=32)

    def train(alpha: float, name: str) -> dict:
        trainer = trainer_module.build_trainer(TrainJob(
            tiny_llama(), examples(8), tmp_path / name, settings=settings, teacher=tiny_llama(seed=4),
            objective={"ce": 1.0, "logits": 1.0}, joint=JointTeaching(alpha=alpha, max_new_tokens=4) if alpha else None,
            tokenizer=tok, template="alpaca", progress=False))
        trainer.fuse_head = fused
        trainer.train()
        return trainer.last_parts

    only_samples = train(1.0, "all-student")
    assert only_samples["ce"] == 0.0 and only_samples["logits"] > 0
    assert train(0.0, "no-joint")["ce"] > 1.0  # a random student's CE on gold: far from zero
