"""The KD trainer: exact loss normalisation across accumulation and processes, objectives, models."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

import llm_fakes as fakes
from lionkd.config import KDConfig, LoraConfig, TrainConfig
from lionkd.kd.examples import Collator, TopK, TrainExample, encode_example
from lionkd.kd.heads import plain_linear_head
from lionkd.kd.job import TrainJob
from lionkd.kd.train import build_trainer, train_student

WORDS = ["the", "a", "cat", "dog", "bird", "sat", "on", "mat", "ran", "to", "park", "what", "did", "do", "answer", "question", "is", "red", "blue", "green", "one", "two", "three", "four", "five", "six", "seven", "big", "small", "happy", "sad", "fast", "slow", "tree", "house", "car"]


# A word-level tokenizer of WORDS (pad_is_eos=True pads with EOS), and models sized to its ids.
tiny_tokenizer = partial(fakes.tiny_tokenizer, None, words=WORDS)
tiny_llama = partial(fakes.tiny_llama, 64, kv_heads=4, max_positions=128, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
tiny_t5 = partial(fakes.tiny_t5, 64, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, dropout_rate=0.0)


def examples(n: int = 8) -> list[TrainExample]:
    """Prompts and targets of different lengths, so micro-batches hold different token counts."""
    out = []
    for i in range(n):
        prompt = " ".join(WORDS[i : i + 2 + i % 3])
        target = " ".join(WORDS[(3 * i) % 20 : (3 * i) % 20 + 1 + (i * 5) % 7])
        out.append(TrainExample(prompt=prompt, target=target))
    return out


class GradRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def first_step_grads(batch_size: int, grad_accum: int, objective: str, out_dir: Path) -> dict[str, torch.Tensor]:
    settings = TrainConfig(
        precision="fp32", max_steps=1, batch_size=batch_size, grad_accum=grad_accum, learning_rate=1e-3, max_length=32, seed=0,
        warmup_ratio=0.0,
    )
    teacher = tiny_llama(seed=1) if objective != "ce" else None
    trainer = build_trainer(TrainJob(
        tiny_llama(), examples(8), out_dir, settings=settings, teacher=teacher, objective=objective,
        tokenizer=tiny_tokenizer(), template="alpaca", progress=False,
    ))
    trainer.args.max_grad_norm = 1e9  # compare raw gradients
    recorder = GradRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    return recorder.grads[0]


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("objective", ["ce", "logits"])
def test_accumulation_matches_one_big_batch(tmp_path: Path, objective: str) -> None:
    big = first_step_grads(8, 1, objective, tmp_path / "big")
    split = first_step_grads(8, 2, objective, tmp_path / "split")  # the same global batch, in 2 micro-batches
    assert_same_grads(big, split)
    # the split must not be trivially equal: per-micro-batch means would differ here
    tok = tiny_tokenizer()
    counts = [sum(len(encode_example(tok, e, template="alpaca")["target"]) for e in part)
              for part in (examples(8)[:4], examples(8)[4:])]
    assert counts[0] != counts[1]


def test_ce_finetune_reduces_loss_and_saves(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    data = [TrainExample(prompt="what did the cat do", target="the cat sat on the mat")] * 8
    settings = TrainConfig(precision="fp32", epochs=15, learning_rate=3e-2, batch_size=4, max_length=32, logging_steps=1)
    metrics = train_student(TrainJob(tiny_llama(), data, tmp_path / "m", settings=settings, tokenizer=tok,
                                     template="alpaca", progress=False))
    assert metrics["steps"] == 30 and metrics["tokens_per_s"] > 0
    assert metrics["final_logged_loss"] < 0.2 and metrics["loss"] > 5 * metrics["final_logged_loss"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "m")
    prompt = encode_example(reloaded, data[0], template="alpaca")["prompt"]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert reloaded.decode(out[0, len(prompt):], skip_special_tokens=True) == "the cat sat on the mat"
    # a finished run is not trained again
    assert train_student(TrainJob("unused", data, tmp_path / "m", settings=settings)) == json.loads(
        (tmp_path / "m" / "train_metrics.json").read_text())


def test_logits_kd_moves_student_towards_teacher(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    teacher = tiny_llama(seed=3)
    settings = TrainConfig(precision="fp32", epochs=8, learning_rate=1e-2, batch_size=4, max_length=32, logging_steps=1)
    for divergence in ("forward_kl", "jsd"):
        kd = KDConfig(divergence=divergence)
        metrics = train_student(TrainJob(tiny_llama(), examples(8), tmp_path / divergence, settings=settings,
                                         teacher=teacher, kd=kd, tokenizer=tok, template="alpaca", progress=False))
        assert metrics["objective"] == {"logits": 1.0}
        assert metrics["last_losses"]["logits"] < 0.5 * metrics["loss"]


def test_weighted_objectives_with_attention_and_noisy(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    teacher = tiny_llama(seed=3, hidden=64)  # wider teacher: relations still comparable
    teacher.config.attention_dropout = 0.1
    settings = TrainConfig(precision="fp32", max_steps=3, learning_rate=1e-2, batch_size=4, max_length=32, logging_steps=1)
    weights = {"logits": 0.5, "attention": 0.5, "noisy": 0.2, "ce": 0.0}
    metrics = train_student(TrainJob(tiny_llama(), examples(8), tmp_path / "w", settings=settings, teacher=teacher,
                                     objective=weights, tokenizer=tok, template="alpaca", progress=False))
    assert set(metrics["last_losses"]) == {"logits", "attention", "noisy"}
    assert all(v > 0 for v in metrics["last_losses"].values())


def test_encoder_decoder_t5(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    data = [TrainExample(prompt="what did the dog do", target="the dog ran to the park")] * 8
    settings = TrainConfig(precision="fp32", epochs=10, learning_rate=1e-2, batch_size=4, max_length=32, logging_steps=1)
    metrics = train_student(TrainJob(tiny_t5(), data, tmp_path / "t5", settings=settings, teacher=tiny_t5(seed=5, d_model=64),
                                     objective={"ce": 1.0, "logits": 0.5, "attention": 0.5}, tokenizer=tok, progress=False))
    assert metrics["last_losses"]["ce"] < 1.0
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5")
    src = tok("what did the dog do")["input_ids"]
    out = model.generate(torch.tensor([src]), max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True) == "the dog ran to the park"


def test_lora_trains_adapters_and_saves_merged(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    base = tiny_llama()
    before = {n: p.clone() for n, p in base.named_parameters()}
    data = [TrainExample(prompt="what did the cat do", target="the cat sat on the mat")] * 8
    settings = TrainConfig(precision="fp32", epochs=3, learning_rate=1e-2, batch_size=4, max_length=32)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    train_student(TrainJob(base, data, tmp_path / "lora", settings=settings, tokenizer=tok, lora=lora, template="alpaca",
                           progress=False))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    after = dict(merged.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)


class HeadWidths:
    """The number of positions each output layer scores (0 when the fused path skips it)."""

    def __init__(self, *models: torch.nn.Module) -> None:
        self.widths: list[int] = []
        for m in models:
            m.get_output_embeddings().register_forward_hook(lambda _m, _i, out: self.widths.append(out.shape[-2]))


def one_step_fused_vs_logits(student_fn, teacher_fn, objective, kd: KDConfig, tmp_path: Path, data=None):  # noqa: ANN001, ANN201
    results = {}
    for fuse in (True, False):
        settings = TrainConfig(precision="fp32", max_steps=1, batch_size=8, learning_rate=1e-3, max_length=32, seed=0, warmup_ratio=0.0)
        student, teacher = student_fn(), teacher_fn() if teacher_fn else None
        widths = HeadWidths(*(m for m in (student, teacher) if m is not None))
        trainer = build_trainer(TrainJob(student, data or examples(8), tmp_path / str(fuse), settings=settings, teacher=teacher,
                                         objective=objective, kd=kd, tokenizer=tiny_tokenizer(), template="alpaca",
                                         progress=False))
        trainer.fuse_head = fuse
        trainer.args.max_grad_norm = 1e9
        recorder = GradRecorder()
        trainer.add_callback(recorder)
        trainer.train()
        results[fuse] = (recorder.grads[0], trainer.last_parts, widths.widths)
    return results


@pytest.mark.parametrize(
    ("objective", "kd"),
    [("logits", KDConfig()), ({"ce": 0.3, "logits": 1.0}, KDConfig(divergence="reverse_kl", temperature=2.0)),
     ({"logits": 1.0}, KDConfig(divergence="jsd", jsd_beta=0.3, temperature=0.7))],
)
def test_fused_head_step_equals_logits_step(tmp_path: Path, objective, kd: KDConfig) -> None:  # noqa: ANN001
    results = one_step_fused_vs_logits(tiny_llama, lambda: tiny_llama(seed=1, hidden=48), objective, kd, tmp_path)
    (fused, fused_parts, fused_widths), (plain, plain_parts, plain_widths) = results[True], results[False]
    assert_same_grads(fused, plain)
    assert fused_parts.keys() == plain_parts.keys()
    for name in plain_parts:
        assert fused_parts[name] == pytest.approx(plain_parts[name], rel=1e-5)
    # the fused step never scores a position with the output layers; the logits step does
    assert fused_widths == [0, 0] and min(plain_widths) > 0


def test_fused_head_step_equals_logits_step_t5(tmp_path: Path) -> None:
    """T5 with tied embeddings scales its decoder output before lm_head: the fused path must too."""
    assert tiny_t5().config.tie_word_embeddings
    results = one_step_fused_vs_logits(tiny_t5, lambda: tiny_t5(seed=5, d_model=64), {"ce": 1.0, "logits": 0.5},
                                       KDConfig(), tmp_path)
    assert_same_grads(results[True][0], results[False][0])
    assert results[True][2] == [0, 0]


def test_fused_head_step_with_cached_topk(tmp_path: Path) -> None:
    rng = torch.Generator().manual_seed(0)
    data = []
    for e in examples(8):
        n = len(e.target.split()) + 1  # target words and EOS
        ids = torch.stack([torch.randperm(40, generator=rng)[:3] for _ in range(n)])
        lps = torch.tensor([0.5, 0.2, 0.1]).log().expand(n, 3)
        data.append(TrainExample(prompt=e.prompt, target=e.target, teacher_topk=TopK(ids.tolist(), lps.tolist())))
    results = one_step_fused_vs_logits(tiny_llama, None, "logits", KDConfig(temperature=1.5), tmp_path, data=data)
    assert_same_grads(results[True][0], results[False][0])
    assert results[True][2] == [0]


def test_plain_linear_head_detection() -> None:
    model = tiny_llama()
    assert plain_linear_head(model) is model.lm_head

    class ScaledHead(torch.nn.Linear):  # post-processed logits: the fused path would be wrong
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 0.5

    model.lm_head = ScaledHead(32, 64, bias=False)
    assert plain_linear_head(model) is None


def test_eos_is_learned_when_pad_equals_eos() -> None:
    tok = tiny_tokenizer(pad_is_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    feats = [encode_example(tok, e, template="alpaca") for e in examples(3)]
    batch = Collator(pad_token_id=tok.pad_token_id)(feats)
    for i, f in enumerate(feats):
        last = len(f["prompt"]) + len(f["target"]) - 1  # the EOS position
        assert batch["input_ids"][i, last] == tok.eos_token_id
        assert batch["target_mask"][i, last - 1] == 1  # the position predicting EOS is trained
        assert batch["target_ids"][i, last - 1] == tok.eos_token_id
        assert batch["target_mask"][i, last:].sum() == 0  # padding after it is not
        assert batch["target_mask"][i, : len(f["prompt"]) - 1].sum() == 0  # prompt is not


def test_training_curves_go_to_wandb_offline_named_by_run_and_stage(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    settings = TrainConfig(precision="fp32", max_steps=3, learning_rate=1e-2, batch_size=4, max_length=32,
                           logging_steps=1, report_to=["wandb"])
    for k in (1, 2):  # two trainings in one process (two Lion iterations): two runs, each with its name
        out = tmp_path / "myrun" / "students" / f"iter-{k}"
        train_student(TrainJob(tiny_llama(), examples(8), out, settings=settings, tokenizer=tiny_tokenizer(),
                               template="alpaca", progress=False))
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    names = []
    for run in runs:
        history = b"".join(p.read_bytes() for p in run.glob("*.wandb"))  # the offline run's record
        assert b"train/loss" in history
        names += [k for k in (1, 2) if f"myrun/iteration-{k}/imitation".encode() in history]
    assert len(runs) == 2 and sorted(names) == [1, 2]


# --------------------------------------------------------------------------- attention relations


def test_attention_stacks_include_cross_attention() -> None:
    from lionkd.kd.attention import last_self_attentions

    assert set(last_self_attentions(tiny_t5())) == {"encoder", "decoder", "cross"}
    assert set(last_self_attentions(tiny_llama())) == {"decoder"}


def _attention_trainer(tmp_path: Path, **kd: object):
    from lionkd.config import KDConfig
    from lionkd.kd.job import TrainJob
    from lionkd.kd.train import build_trainer

    data = [TrainExample(prompt="what did the dog do", target="the dog ran")] * 4
    return build_trainer(TrainJob(tiny_t5(), data, tmp_path, settings=TrainConfig(precision="fp32"), teacher=tiny_t5(seed=5),
                                  objective={"logits": 0.5, "attention": 0.5}, kd=KDConfig(**kd), tokenizer=tiny_tokenizer(),
                                  progress=False))


def test_encoder_relations_are_a_mean_per_row_whatever_the_target_length(tmp_path: Path) -> None:
    trainer = _attention_trainer(tmp_path)
    g = torch.Generator().manual_seed(0)
    s = {("encoder", k): torch.randn(2, 5, 32, generator=g) for k in "qkv"}
    t = {("encoder", k): torch.randn(2, 5, 32, generator=g) for k in "qkv"}
    source = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])

    def loss(target_len: int, student: dict) -> float:
        inputs = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": source,
                  "decoder_input_ids": torch.zeros(2, target_len, dtype=torch.long),
                  "decoder_attention_mask": torch.ones(2, target_len, dtype=torch.long),
                  "token_mask": torch.ones(2, target_len)}
        return float(trainer._attention_loss(student, t, inputs, step_counts=False))

    assert loss(3, t) == pytest.approx(0.0, abs=1e-6)  # identical states: nothing to learn
    short, long = loss(3, s), loss(21, s)
    assert short > 0.05 and short == pytest.approx(long, rel=1e-6)  # 3 or 21 target tokens: the same


def test_attention_term_is_scaled_to_its_share(tmp_path: Path) -> None:
    trainer = _attention_trainer(tmp_path)
    trainer.state.global_step = 0
    # a relation KL 20x smaller than the logits KD: 0.5/0.5 must still be half and half
    assert trainer._attention_scale(torch.tensor(0.1), {"logits": torch.tensor(2.0)}) == pytest.approx(20.0)
    # fixed within a step, whatever a later micro-batch measures
    assert trainer._attention_scale(torch.tensor(1.0), {"logits": torch.tensor(1.0)}) == pytest.approx(20.0)
    trainer.state.global_step = 1  # the finished step's sizes (3.0 vs 1.1) become the running ratio
    assert trainer._attention_scale(torch.tensor(5.0), {"logits": torch.tensor(1.0)}) == pytest.approx(3.0 / 1.1)
    raw = _attention_trainer(tmp_path / "raw", attention_scale="raw")
    assert raw._attention_scale(torch.tensor(0.1), {"logits": torch.tensor(2.0)}) == 1.0


# --------------------------------------------------------------------------- noisy KD


def test_noisy_kd_input_noise_and_teacher_dropout(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from lionkd.kd.objectives import has_dropout, noisy_input_ids

    llama = tiny_llama()
    assert not has_dropout(llama)  # Llama-family configs: every dropout is 0
    llama.config.attention_dropout = 0.1
    assert has_dropout(llama) and has_dropout(torch.nn.Sequential(torch.nn.Dropout(0.1)))
    assert not has_dropout(tiny_t5())  # built with dropout_rate 0

    torch.manual_seed(0)
    ids = torch.randint(4, 64, (8, 50))
    ids[:, 0] = 1  # a special token (BOS) opens every row
    where = torch.zeros(8, 50, dtype=torch.bool)
    where[:, :30] = True  # the prompt; the rest is the target
    assert torch.equal(noisy_input_ids(ids, where, 0.0, 64, [0, 1, 2, 3]), ids)
    noised = noisy_input_ids(ids, where, 0.5, 64, [0, 1, 2, 3])
    changed = noised != ids
    assert not changed[:, 30:].any() and not changed[:, 0].any()  # targets and special tokens stay
    assert 0.3 < changed[:, 1:30].float().mean() < 0.55  # about half, less the draws of the same token
    assert not torch.isin(noised[changed], torch.tensor([0, 1, 2, 3])).any()

    settings = TrainConfig(precision="fp32", max_steps=1, batch_size=4, max_length=32)
    metrics = train_student(TrainJob(tiny_llama(), examples(4), tmp_path / "noisy", settings=settings, teacher=tiny_llama(seed=2),
                                     objective="noisy", tokenizer=tiny_tokenizer(), template="alpaca", progress=False))
    assert metrics["noisy_teacher_dropout"] is False
    assert "the teacher has no dropout" in capfd.readouterr().err


def test_a_training_that_goes_non_finite_stops_and_saves_nothing(tmp_path: Path) -> None:
    from lionkd.kd.train import NonFiniteTraining

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")  # every forward from here on is NaN
    settings = TrainConfig(precision="fp32", max_steps=4, learning_rate=1e-3, batch_size=4, max_length=32,
                           logging_steps=1, save_steps=1)
    with pytest.raises(NonFiniteTraining, match=r"became NaN or infinite by step 1; the student was not saved"):
        train_student(TrainJob(model, examples(8), tmp_path / "iter-1", settings=settings, tokenizer=tiny_tokenizer(),
                               template="alpaca", progress=False))
    out = tmp_path / "iter-1"
    assert not (out / "train_metrics.json").exists() and not (out / "config.json").exists()
    assert not (out / "checkpoints").exists()  # a rerun does not resume from a NaN checkpoint
