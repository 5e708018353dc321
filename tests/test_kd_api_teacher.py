"""Black-box logit KD: served logprobs that spell the text, API PTs with top-k, aligned sparse targets,
cross-tokenizer white-box KD, and `lionkd distill` end to end over HTTP with an API teacher."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

import openai
import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from lionkd.config import RunConfig, TrainConfig, load_config
from lionkd.errors import BudgetExceeded
from lionkd.kd.api_teacher import (
    APIPTConfig,
    aligned_examples,
    cross_tokenizer_examples,
    generate_api_pseudo_targets,
    teacher_messages,
)
from lionkd.kd.examples import Collator, TrainExample, encode_example
from lionkd.kd.job import TrainJob
from lionkd.kd.losses import sparse_kd_loss
from lionkd.kd.train import train_student
from lionkd.llm.base import Backend, GenRequest, GenResult
from lionkd.llm.cache import CachedLLM
from lionkd.llm.hf import HFBackend
from lionkd.llm.openai_backend import OpenAIBackend
from lionkd.llm.server import ServerThread, create_app
from lionkd.store import Store
from llm_fakes import tiny_model, tiny_tokenizer

WORDS = "the quick brown fox jumps over the lazy dog add 12 and 30 sort the list reverse the word lion"
QUESTIONS = ["add 12 and 30", "sort the list 3 1 2", "reverse the word lion", "what is the capital of france",
             "the quick brown fox", "a teacher answers"]


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A student tokenizer of another family than the teacher's byte-level BPE."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[SEP]"],
                                        show_progress=False)
    tok.train_from_iterator([WORDS, *QUESTIONS, "héllo 中文 ok, what is it?"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]", pad_token="[PAD]")


def word_teacher(tok, *, force: str | None = None) -> LlamaForCausalLM:
    """A tiny Llama that samples words of WORDS (or writes exactly `force`), then stops."""
    model = tiny_model(tok)
    if force is not None:
        ids = [*tok(force, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        model.generation_config.sequence_bias = {tuple(ids[: i + 1]): 100.0 * (i + 1) for i in range(len(ids))}
    else:
        word_ids = {i for w in WORDS.split() for i in tok(" " + w, add_special_tokens=False)["input_ids"]}
        model.generation_config.sequence_bias = {(i,): 6.0 for i in word_ids} | {(tok.eos_token_id,): 3.0}
    return model


class Counting(Backend):
    """Counts the requests that reach a backend (what a paid API would bill)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.model)
        self.inner, self.kind, self.requests = inner, inner.kind, 0

    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        self.requests += len(requests)
        async for item in self.inner.stream(requests):
            yield item


# --------------------------------------------------------------------------- 1. served tokens spell the text


def test_served_tokens_spell_non_ascii_text_and_carry_raw_bytes():
    tok = tiny_tokenizer()
    text = "héllo 中文 ok"
    backend = HFBackend(word_teacher(tok, force=text), tokenizer=tok)
    with ServerThread(create_app({"teacher": backend})) as server:
        sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        reply = sdk.chat.completions.create(model="teacher", messages=[{"role": "user", "content": "hi"}],
                                            temperature=0, max_tokens=30, logprobs=True, top_logprobs=3)
        remote = OpenAIBackend("teacher", base_url=server.base_url, api_key="unused").generate(
            [GenRequest.chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=30, logprobs=3)])[0]
    content = reply.choices[0].logprobs.content
    assert reply.choices[0].message.content == text
    assert "".join(t.token for t in content) == text  # no U+FFFD, no extra space
    assert b"".join(bytes(t.bytes) for t in content) == text.encode()
    # '中' is three bytes in two tokens: the first token writes the character, the second only has bytes
    split = [t for t in content if t.token == "" and t.bytes]
    assert split and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in remote.choices[0].logprobs) == remote.text == text


# --------------------------------------------------------------------------- 2. API PTs and aligned targets


def test_api_pts_are_cached_stored_and_align_to_another_tokenizer(tmp_path):
    teacher_tok, student_tok = tiny_tokenizer(), wordpiece_tokenizer()
    backend = Counting(HFBackend(word_teacher(teacher_tok), tokenizer=teacher_tok))
    inputs = [TrainExample(target="", prompt=q) for q in QUESTIONS[:4]]
    demos = [TrainExample(target="42", prompt="add 12 and 30")]
    settings = APIPTConfig(k=2, top_logprobs=4, fewshot=1, max_tokens=10, seed=3)
    # the demonstration is shown to other inputs, never to itself; zero demonstrations: instruction only
    assert len(teacher_messages(inputs[1], demos, "Do it.", 1)) == 4
    assert len(teacher_messages(inputs[0], demos, "Do it.", 1)) == 2
    assert teacher_messages(inputs[1], demos, "", 0) == [{"role": "user", "content": inputs[1].prompt}]

    with Store.open_run(tmp_path / "run") as store, ServerThread(create_app({"teacher": backend})) as server:
        llm = CachedLLM(OpenAIBackend("teacher", base_url=server.base_url, api_key="unused"), store, role="teacher")
        pts = generate_api_pseudo_targets(llm, inputs, demos, settings, store=store)
        sent = backend.requests
        again = generate_api_pseudo_targets(llm, inputs, demos, settings, store=store)
        stored = store.pseudo_targets()
    assert sent == len(inputs) and backend.requests == sent  # the rerun came from the call cache
    assert [p.text for p in again] == [p.text for p in pts]
    assert len(stored) == len(inputs) * 2 and {p.index for p in stored} == {0, 1}
    assert all(p.logprobs and {"token", "logprob", "bytes", "top"} <= set(p.logprobs[0]) for p in stored)
    assert all(len(t["top"]) == 4 for p in stored for t in p.logprobs)

    examples, stats = aligned_examples(stored, student_tok, {x.id: x for x in inputs}, k=4)
    assert len(examples) == len([p for p in stored if p.text.strip()]) and stats.aligned > 0
    assert 0 < stats.aligned_fraction <= 1 and 0 < stats.mass_kept <= 1
    for e in examples:
        rows = e.teacher_topk
        assert all(len(r) == 5 and len(set(r)) == 5 and min(r) >= 0 for r in rows.ids)  # fixed width, distinct
        assert rows.logprobs[-1][0] == 0.0 and rows.ids[-1][0] == student_tok.eos_token_id  # EOS: cross-entropy
        assert all(lp <= 1e-6 for r in rows.logprobs for lp in r)
    # the trainer's collation takes them, and the sparse loss is finite
    feats = [encode_example(student_tok, e, template="alpaca") for e in examples]
    batch = Collator(pad_token_id=student_tok.pad_token_id)(feats)
    logits = torch.randn(*batch["input_ids"].shape, len(student_tok))
    for tail in ("rest", "renorm"):
        loss = sparse_kd_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["target_mask"], tail=tail)
        assert torch.isfinite(loss)


# --------------------------------------------------------------------------- 3. cross-tokenizer white-box KD


def test_cross_tokenizer_white_box_kd_trains_on_aligned_targets(tmp_path):
    teacher_tok, student_tok = tiny_tokenizer(), wordpiece_tokenizer()
    teacher = tiny_model(teacher_tok, seed=1)
    student = tiny_model(student_tok, seed=2)
    examples = [TrainExample(target=t, prompt=q) for q, t in
                [("add 12 and 30", "the quick brown fox"), ("sort the list", "jumps over the lazy dog"),
                 ("reverse the word lion", "lion the word"), ("what is it", "héllo 中文 ok")]]
    sparse, stats = cross_tokenizer_examples(teacher, teacher_tok, student_tok, examples, k=5, template="alpaca")
    assert stats.aligned > 0 and stats.mass_kept > 0  # tiny vocabularies share few word boundaries

    def loss() -> float:
        feats = [encode_example(student_tok, e, template="alpaca") for e in sparse]
        batch = Collator(pad_token_id=student_tok.pad_token_id)(feats)
        with torch.no_grad():
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(sparse_kd_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["target_mask"]))

    before = loss()
    settings = TrainConfig(max_steps=40, learning_rate=5e-3, batch_size=4, warmup_ratio=0.0, logging_steps=10,
                           save_steps=1000, lr_scheduler="constant")
    metrics = train_student(TrainJob(student, sparse, tmp_path / "out", settings=settings, objective={"logits": 1.0},
                                     tokenizer=student_tok, template="alpaca", progress=False))
    assert metrics["steps"] == 40
    assert loss() < 0.7 * before


# --------------------------------------------------------------------------- 4. lionkd distill over HTTP


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_distill_with_an_api_teacher_trains_on_aligned_top_k(tmp_path, monkeypatch):
    import lionkd.kd.train as trainer_module
    from lionkd.distill.pipeline import distill

    teacher_tok, student_tok = tiny_tokenizer(), wordpiece_tokenizer()
    backend = Counting(HFBackend(word_teacher(teacher_tok), tokenizer=teacher_tok))
    student_dir = tmp_path / "student0"
    tiny_model(student_tok, seed=4).save_pretrained(student_dir)
    student_tok.save_pretrained(student_dir)
    labeled = _write_rows(tmp_path / "labeled.jsonl", [{"input": q, "target": "the fox"} for q in QUESTIONS[:3]])
    unlabeled = _write_rows(tmp_path / "unlabeled.jsonl", [{"input": q} for q in QUESTIONS[3:]])
    evals = _write_rows(tmp_path / "eval.jsonl", [{"input": "add 12 and 30", "target": "the fox"}])

    seen: list = []  # what the KD trainer was given
    real = trainer_module.train_student

    def spy(job):
        seen.append((job.examples, job.objective, job.teacher))
        return real(job)

    monkeypatch.setattr(trainer_module, "train_student", spy)
    with ServerThread(create_app({"teacher": backend})) as server:
        config = {
            "run_dir": str(tmp_path / "run"),
            "teacher": {"backend": "openai", "model": "teacher", "base_url": server.base_url, "api_key_env": None,
                        "logprobs": 5},
            "student": {"model": str(student_dir), "template": "alpaca",
                        "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 100}},
            "kd": {"labeled": {"path": labeled}, "unlabeled": {"path": unlabeled}, "eval": {"path": evals},
                   "objective": {"logits": 1.0, "ce": 1.0}, "pt_count": 2, "pt_max_new_tokens": 10, "fewshot": 1,
                   "final_ce_epochs": 0, "eval_num_beams": 1, "eval_max_new_tokens": 6},
        }
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config | {"budget": {"max_calls": 4}}))
        with pytest.raises(BudgetExceeded) as stop:  # the whole stage's rest is named, and that it is the run's
            distill(load_config(tmp_path / "run.yaml"), progress=False)
        left = 2 * (len(QUESTIONS) - 2)  # a request for K = 2 samples is 2 calls
        assert backend.requests == 2 and f"{left} teacher calls of this stage are left" in str(stop.value)
        assert "no later stage calls an API" in str(stop.value)
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))  # a larger budget (none) goes on
        cfg = load_config(tmp_path / "run.yaml")
        summary = distill(cfg, progress=False)
        sent = backend.requests
        again = distill(cfg, progress=False)

    assert sent == len(QUESTIONS) and backend.requests == sent  # one request (n = 2) per input, none twice
    assert "pseudo_targets" in summary.ran and "pseudo_targets" in again.skipped
    (examples, objective, teacher), = seen
    assert objective == {"logits": 1.0, "ce": 1.0} and teacher is None  # sparse targets, no live teacher
    flat = [e for epoch in examples for e in epoch]
    pts = [e for e in flat if e.source == "pt"]
    assert pts and all(e.teacher_topk is not None for e in flat)
    assert sum(any(lp != 0.0 for lp in row[:1]) for e in pts for row in e.teacher_topk.logprobs) > 0  # aligned rows
    with Store.open_existing(cfg.run_dir) as store:
        stored = store.pseudo_targets()
        metrics = store.metrics()[0]
    assert len(stored) == 2 * len(QUESTIONS) and all(p.logprobs for p in stored)
    assert 0 < metrics["align_aligned_fraction"] <= 1 and 0 < metrics["align_mass_kept"] <= 1
    report = json.loads((cfg.run_dir / "eval.json").read_text())
    assert report["alignment"]["aligned_fraction"] == pytest.approx(metrics["align_aligned_fraction"])


def test_api_teacher_without_logprobs_is_sequence_level_kd():
    from lionkd.distill.api_teacher_stages import api_schedule

    cfg = RunConfig.model_validate({"teacher": {"backend": "openai", "model": "m", "logprobs": None}})
    schedule = [[TrainExample(target="x", prompt="y")]]
    assert api_schedule(cfg, [], [], [], schedule, "unused") == (schedule, {"ce": 1.0}, None)
