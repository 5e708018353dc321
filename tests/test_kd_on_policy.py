"""On-policy KD: its losses as math, teacher scoring over real HTTP, training, resuming and bad input."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from lionkd.config import OnPolicyConfig, TrainConfig
from lionkd.errors import UserError
from lionkd.kd.examples import TrainExample
from lionkd.kd.losses import (
    LinearHead,
    divergence_rows,
    fused_head_loss,
    on_policy_k1_term,
    on_policy_loss,
    on_policy_topk_term,
)
from lionkd.kd.on_policy import OnPolicySetup, check_alignment, check_student_samples
from lionkd.llm.cache import CachedLLM
from lionkd.llm.hf import HFBackend
from lionkd.llm.scoring import ScoringBackend, TeacherScorer
from lionkd.llm.server import ServerThread, create_app
from lionkd.llm.templates import render_prompt
from llm_fakes import tiny_model, tiny_tokenizer

# --------------------------------------------------------------------------- the losses as math


def _case(seed: int = 0, b: int = 2, t: int = 5, v: int = 11, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2
    teacher = torch.randn(b, t, v, generator=g) * 2
    mask = (torch.rand(b, t, generator=g) > 0.2).float()
    y = torch.randint(0, v, (b, t), generator=g)
    return logits, teacher, mask, y, k


def test_identical_student_and_teacher_give_zero_loss_and_zero_gradient():
    logits, _, mask, y, k = _case()
    lq = logits.log_softmax(-1)
    top = lq.topk(k, -1)
    s = logits.clone().requires_grad_(True)
    loss = on_policy_loss(s, mask, estimator="topk", teacher_ids=top.indices, teacher_logprobs=top.values)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6 and s.grad.abs().max() < 1e-6
    s = logits.clone().requires_grad_(True)
    own = lq.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    loss = on_policy_loss(s, mask, estimator="k1", token_ids=y, teacher_token_logprobs=own)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6 and s.grad.abs().max() < 1e-6


def test_topk_over_the_whole_vocabulary_is_the_exact_reverse_kl():
    logits, teacher, mask, _, _ = _case()
    v = logits.shape[-1]
    lp = teacher.log_softmax(-1)
    top = lp.topk(v, -1)
    got = on_policy_loss(logits, mask, estimator="topk", teacher_ids=top.indices, teacher_logprobs=top.values)
    rows = divergence_rows(logits.log_softmax(-1).reshape(-1, v), lp.reshape(-1, v), "reverse_kl")
    want = (rows * mask.reshape(-1)).sum() / mask.sum()
    assert torch.allclose(got, want, atol=1e-5)


def test_topk_tail_bucket_holds_the_mass_outside_and_padding_slots():
    logits, teacher, mask, _, k = _case()
    lp = teacher.log_softmax(-1)
    top = lp.topk(k, -1)
    ids = torch.cat([top.indices, torch.full_like(top.indices[..., :1], -1)], -1)  # an empty slot: the tail's
    logprobs = torch.cat([top.values, torch.zeros_like(top.values[..., :1])], -1)
    padded = on_policy_loss(logits, mask, estimator="topk", teacher_ids=ids, teacher_logprobs=logprobs)
    plain = on_policy_loss(logits, mask, estimator="topk", teacher_ids=top.indices, teacher_logprobs=top.values)
    assert torch.allclose(padded, plain, atol=1e-6)
    # by hand for one row: buckets = the k tokens and the rest, on both sides
    q, p = logits[0, 0].softmax(-1), lp[0, 0].exp()
    idx = top.indices[0, 0]
    qb = torch.cat([q[idx], (1 - q[idx].sum()).unsqueeze(0)])
    pb = torch.cat([p[idx], (1 - p[idx].sum()).unsqueeze(0)])
    one = on_policy_loss(logits[:1, :1], torch.ones(1, 1), estimator="topk", teacher_ids=top.indices[:1, :1],
                         teacher_logprobs=top.values[:1, :1])
    assert float(one) == pytest.approx(float((qb * (qb.log() - pb.log())).sum()), abs=1e-5)


def test_k1_value_is_the_log_ratio_and_its_gradient_the_score_function():
    logits, teacher, mask, y, _ = _case()
    lp = teacher.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    s = logits.clone().requires_grad_(True)
    loss = on_policy_loss(s, mask, estimator="k1", token_ids=y, teacher_token_logprobs=lp)
    loss.backward()
    lq_all = logits.log_softmax(-1)
    lq = lq_all.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    n = mask.sum()
    assert float(loss.detach()) == pytest.approx(float(((lq - lp) * mask).sum() / n), abs=1e-5)
    onehot = torch.nn.functional.one_hot(y, logits.shape[-1]).float()
    want = ((lq - lp) * mask / n).unsqueeze(-1) * (onehot - lq_all.exp())
    assert torch.allclose(s.grad, want, atol=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "topk"])
def test_fused_terms_equal_the_logits_losses(estimator):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=g)
    weight = torch.randn(11, 8, generator=g)
    _, teacher, mask, y, k = _case(1)
    lp_all = teacher.log_softmax(-1)
    top = lp_all.topk(k, -1)
    lp = lp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    args = dict(token_ids=y, teacher_token_logprobs=lp, teacher_ids=top.indices, teacher_logprobs=top.values)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    want = on_policy_loss(h1 @ w1.T, mask, estimator=estimator, **args)
    want.backward()
    term = on_policy_k1_term(y, lp) if estimator == "k1" else on_policy_topk_term(top.indices, top.values)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    got, _ = fused_head_loss(LinearHead(h2, w2), mask, terms={"op": (1.0, term)})
    got.backward()
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5) and torch.allclose(w1.grad, w2.grad, atol=1e-5)


# --------------------------------------------------------------------------- scoring over HTTP


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tok, tiny_model(tok, seed=1)


@pytest.fixture(scope="module")
def served(tiny):
    from lionkd.llm.sandbox_backend import SandboxBackend

    tok, model = tiny
    app = create_app({"t": HFBackend(model, tokenizer=tok), "teacher": SandboxBackend("teacher")})
    requests = {"completions": 0}

    @app.middleware("http")
    async def count(request, call_next):  # what the teacher was asked, whoever asked it
        if request.url.path.endswith("/completions"):
            requests["completions"] += 1
        return await call_next(request)

    with ServerThread(app) as srv:
        srv.requests = requests
        yield srv


@pytest.mark.parametrize("scoring", ["vllm", "echo", "auto"])
def test_scores_over_http_are_the_models_own_log_probabilities(tiny, served, scoring):
    tok, model = tiny
    backend = ScoringBackend("t", base_url=served.base_url, scoring=scoring)
    scorer = TeacherScorer(CachedLLM(backend, None), 4)
    context, completion = "<|user|>\nadd 12 and 30\n<|assistant|>\n", "the quick fox"
    (tokens,) = scorer.score([(context, completion)])
    assert "".join(t.token for t in tokens) == completion
    ids = tok(context + completion)["input_ids"]
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    n = len(tokens)
    want = [float(lp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids))]
    assert [t.logprob for t in tokens] == pytest.approx(want, abs=1e-4)
    assert all(len(t.top) == 4 for t in tokens)
    assert backend.scoring == ("vllm" if scoring == "auto" else scoring)


@pytest.mark.parametrize("scoring", ["sglang", "auto"])
def test_sglang_native_generate_scores(tiny, scoring):
    """A server with SGLang's native /generate only (its /v1/completions does not score prompts)."""
    from fastapi import FastAPI

    from lionkd.llm.scoring import score_prompt

    tok, model = tiny
    backend = HFBackend(model, tokenizer=tok)
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "t", "object": "model"}]}

    @app.post("/generate")
    async def generate(body: dict):
        assert body["return_logprob"] and body["logprob_start_len"] == 0
        tokens = score_prompt(backend, body["text"], body["top_logprobs_num"])
        return {"text": "", "meta_info": {
            "prompt_tokens": len(tokens),
            "input_token_logprobs": [[t.logprob, t.id, t.token] for t in tokens],
            "input_top_logprobs": [None if t.logprob is None else [[v, a, s] for a, s, v in t.top] for t in tokens]}}

    context, completion = "<|user|>\nadd 12 and 30\n<|assistant|>\n", "the quick fox"
    with ServerThread(app) as server:
        backend_http = ScoringBackend("t", base_url=server.base_url, scoring=scoring, max_retries=0)
        (tokens,) = TeacherScorer(CachedLLM(backend_http, None), 3).score([(context, completion)])
    assert backend_http.scoring == "sglang" and "".join(t.token for t in tokens) == completion
    ids = tok(context + completion)["input_ids"]
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    want = [float(lp[t - 1, ids[t]]) for t in range(len(ids) - len(tokens), len(ids))]
    assert [t.logprob for t in tokens] == pytest.approx(want, abs=1e-4) and all(len(t.top) == 3 for t in tokens)


def test_echoed_scores_without_text_offsets_are_read_from_the_end():
    from lionkd.llm.scoring import ScoreRequest, parse_echo_scores

    tokens = ["Q", ":", " hi", "\n", "A", ":", " the", " fox", "!"]  # the last one was generated
    choice = {"logprobs": {"tokens": tokens, "token_logprobs": [None, *[-float(i) for i in range(1, 9)]],
                           "top_logprobs": [None, *[{t: -0.5} for t in tokens[1:]]], "text_offset": []}}
    got = parse_echo_scores(choice, ScoreRequest("Q: hi\nA:", " the fox", 2), generated=1)
    assert [(t.token, t.logprob) for t in got] == [(" the", -6.0), (" fox", -7.0)]


def test_a_server_that_cannot_score_prompts_is_named_on_the_first_call(served):
    scorer = TeacherScorer(CachedLLM(ScoringBackend("teacher", base_url=served.base_url), None), 4)
    with pytest.raises(UserError) as err:
        scorer.check()
    text = str(err.value)
    assert "\n" not in text and "cannot score prompts" in text and "'teacher'" in text
    assert scorer.stats["calls_sent"] == 0


def test_scores_are_cached_in_the_run_store(tiny, served, tmp_path):
    from lionkd.store import Store

    with Store.open_run(tmp_path) as store:
        llm = CachedLLM(ScoringBackend("t", base_url=served.base_url), store, role="teacher")
        first, again = TeacherScorer(llm, 3), TeacherScorer(llm, 3)
        pairs = [("<|user|>\nhi\n<|assistant|>\n", "the fox"), ("<|user|>\nyo\n<|assistant|>\n", "a dog")]
        sent = _teacher_requests(served)
        a, b = first.score(pairs), again.score(pairs)
        assert _teacher_requests(served) == sent + 2
        assert first.stats["calls_sent"] == 2 and again.stats["calls_sent"] == 0 and again.stats["calls_cached"] == 2
        assert [[t.logprob for t in x] for x in a] == [[t.logprob for t in x] for x in b]
        assert sum(r["calls"] for r in store.usage() if r["role"] == "teacher") == 2


def test_scoring_calls_keep_to_the_budget(served, tmp_path):
    from lionkd.budget import Budget
    from lionkd.config import RunConfig
    from lionkd.errors import BudgetExceeded
    from lionkd.store import Store

    with Store.open_run(tmp_path) as store:
        store.budget = Budget.for_run(RunConfig.model_validate({"teacher": {"budget": {"max_calls": 2}}}), store)
        scorer = TeacherScorer(CachedLLM(ScoringBackend("t", base_url=served.base_url), store, role="teacher"), 3)
        pairs = [(f"<|user|>\nq{i}\n<|assistant|>\n", "the fox") for i in range(3)]
        with pytest.raises(BudgetExceeded, match="teacher.budget reached"):
            scorer.score(pairs)
        assert sum(r["calls"] for r in store.usage() if r["role"] == "teacher") == 2
        assert scorer.score(pairs[:2])[0] is not None  # what was paid for is kept: no new call


# --------------------------------------------------------------------------- training


EXAMPLES = ["add 12 and 30", "sort the list 3 1 2", "reverse the word lion", "what is the capital of france"]


def _train(tok, student, served_url, out, *, store=None, max_steps=3, callbacks=(), lmbda=1.0, objective=None):
    from lionkd.kd.job import TrainJob
    from lionkd.kd.train import train_student

    examples = [TrainExample(target="the quick fox", prompt=p) for p in EXAMPLES]
    scorer = TeacherScorer(CachedLLM(ScoringBackend("t", base_url=served_url), store, role="teacher"), 4)
    setup = OnPolicySetup(OnPolicyConfig(max_new_tokens=6, lmbda=lmbda, min_aligned=0.0), scorer,
                          {e.id: render_prompt(tok, e.prompt_messages(), "alpaca") for e in examples})
    settings = TrainConfig(batch_size=2, max_steps=max_steps, logging_steps=1, save_steps=1, learning_rate=1e-3)
    return train_student(TrainJob(student, examples, out, settings=settings, template="alpaca", tokenizer=tok,
                                  objective=objective or {"on_policy": 1.0}, progress=False, on_policy=setup,
                                  callbacks=list(callbacks))), scorer


def test_on_policy_training_logs_its_loss_and_reverse_kl_per_step(tiny, served, tmp_path):
    tok, _ = tiny
    metrics, scorer = _train(tok, tiny_model(tok, seed=2), served.base_url, tmp_path / "s", lmbda=0.5,
                             objective={"on_policy": 1.0, "ce": 1.0})
    op = metrics["on_policy"]
    assert [h[0] for h in op["history"]] == [0, 1, 2]
    assert all(math.isfinite(x) for h in op["history"] for x in h[1:])
    assert op["scoring"]["calls_sent"] == op["samples"] + 1  # one check, then one call per sample
    assert 0 < op["samples"] < 6  # lmbda 0.5 of 6 examples
    assert set(metrics["last_losses"]) == {"ce", "on_policy", "reverse_kl"}


def test_a_crash_mid_stage_resumes_without_scoring_a_sample_twice(tiny, served, tmp_path):
    from transformers import TrainerCallback

    from lionkd.store import Store

    tok, _ = tiny

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    def sent(store):
        return sum(r["calls"] for r in store.usage() if r["role"] == "teacher")

    with Store.open_run(tmp_path / "clean") as store:
        _train(tok, tiny_model(tok, seed=2), served.base_url, tmp_path / "clean" / "s", store=store, max_steps=4)
        clean = sent(store)
    with Store.open_run(tmp_path / "crash") as store:
        with pytest.raises(KeyboardInterrupt):
            _train(tok, tiny_model(tok, seed=2), served.base_url, tmp_path / "crash" / "s", store=store,
                   max_steps=4, callbacks=[Crash()])
        before = sent(store)
        metrics, scorer = _train(tok, tiny_model(tok, seed=2), served.base_url, tmp_path / "crash" / "s",
                                 store=store, max_steps=4)
        assert metrics["steps"] == 4
        assert scorer.stats["calls_cached"] >= 2  # step 3's samples were scored before the crash
        assert sent(store) == clean > before


# --------------------------------------------------------------------------- bad input


def test_a_student_that_cannot_sample_is_refused(tiny):
    tok, _ = tiny
    model = tiny_model(tok)
    model.generation_config = None
    with pytest.raises(UserError, match="student.model: the student cannot sample"):
        check_student_samples(model, tok)


def test_on_policy_and_callbacks_refuse_several_processes_before_any_call(tiny, served, tmp_path):
    from lionkd.kd.job import TrainJob
    from lionkd.kd.train import train_student

    tok, _ = tiny
    examples = [TrainExample(target="the quick fox", prompt=p) for p in EXAMPLES]
    two = TrainConfig(batch_size=2, max_steps=1, processes=2)
    scorer = TeacherScorer(CachedLLM(ScoringBackend("t", base_url=served.base_url), None, role="teacher"), 4)
    setup = OnPolicySetup(OnPolicyConfig(), scorer, {e.id: e.prompt for e in examples})
    with pytest.raises(UserError, match="'on_policy' objective trains in one process"):
        train_student(TrainJob(tiny_model(tok), examples, tmp_path / "a", settings=two, tokenizer=tok,
                               objective={"on_policy": 1.0}, on_policy=setup))
    with pytest.raises(UserError, match="its own callbacks runs in one process"):
        train_student(TrainJob(tiny_model(tok), examples, tmp_path / "b", settings=two, tokenizer=tok,
                               callbacks=[object()]))
    assert scorer.stats["calls_sent"] == 0


def test_lmbda_outside_0_1_is_a_config_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        OnPolicyConfig(lmbda=1.5)


def _word_level_tokenizer():
    """A teacher tokenizer that writes every word as one unknown token: nothing lines up with a student's pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")


def _teacher_requests(server) -> int:
    return server.requests["completions"]


def test_tokenizers_that_cannot_be_aligned_are_refused_before_any_call(tiny):
    tok, _ = tiny
    texts = ["the quick brown fox jumps over the lazy dog"]
    assert check_alignment(tok, tok, texts, 0.9, "teacher.tokenizer") == 1.0
    other = _word_level_tokenizer()
    with pytest.raises(UserError, match="teacher.tokenizer: the teacher's tokenizer aligns only"):
        check_alignment(other, tok, texts, 0.9, "teacher.tokenizer")


# --------------------------------------------------------------------------- lionkd distill with a served teacher


def _rows(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _distill_config(tmp_path, base_url, **kd):
    student_dir = tmp_path / "student0"
    tok = tiny_tokenizer()
    tiny_model(tok, seed=2).save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    labeled = _rows(tmp_path / "labeled.jsonl", [{"input": q, "target": "the quick fox"} for q in EXAMPLES])
    evals = _rows(tmp_path / "eval.jsonl", [{"input": "add 12 and 30", "target": "the fox"}])
    return {
        "run_dir": str(tmp_path / "run"),
        "teacher": {"backend": "openai", "model": "t", "base_url": base_url, "api_key_env": None},
        "student": {"model": str(student_dir), "template": "alpaca",
                    "train": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "save_steps": 100}},
        "kd": {"labeled": {"path": labeled}, "eval": {"path": evals}, "pt_method": "none", "final_ce_epochs": 0,
               "objective": {"on_policy": 1.0, "ce": 1.0}, "eval_num_beams": 1, "eval_max_new_tokens": 4,
               "eval_teacher": False, "teacher_instruction": "",
               "on_policy": {"lmbda": 0.5, "max_new_tokens": 6, "min_aligned": 0.0}} | kd,
    }


def test_distill_with_a_served_teacher_trains_on_policy_reports_it_and_never_pays_twice(served, tmp_path):
    import yaml

    from lionkd.config import load_config
    from lionkd.distill.pipeline import distill
    from lionkd.report.build import build_report
    from lionkd.store import Store

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_distill_config(tmp_path, served.base_url)))
    cfg = load_config(tmp_path / "run.yaml")
    summary = distill(cfg, progress=False)
    assert "kd_train" in summary.ran
    with Store.open_existing(cfg.run_dir) as store:
        metrics = store.metrics()[0]
        calls = sum(r["calls"] for r in store.usage() if r["role"] == "teacher")
    assert metrics["on_policy_samples"] > 0 and metrics["on_policy_scoring_calls"] == calls
    assert math.isfinite(metrics["on_policy_reverse_kl"])
    again = distill(load_config(tmp_path / "run.yaml"), progress=False)  # a rerun, as the command reads it
    assert "kd_train" in again.skipped
    with Store.open_existing(cfg.run_dir) as store:
        assert sum(r["calls"] for r in store.usage() if r["role"] == "teacher") == calls
    html, _ = build_report(cfg.run_dir)
    text = html.read_text()
    assert 'id="on-policy"' in text and "reverse KL (k1)" in text


def test_distill_bad_input_is_one_line_before_any_paid_call(served, tmp_path, cli):
    import yaml

    from conftest import one_line
    from lionkd.config import load_config
    from lionkd.distill.pipeline import distill

    def write(name, **changes):
        config = _distill_config(tmp_path, served.base_url)
        config["run_dir"] = str(tmp_path / name)
        config["teacher"] |= changes.get("teacher", {})
        config["kd"]["on_policy"] |= changes.get("on_policy", {})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        return tmp_path / f"{name}.yaml"

    # a server that cannot score prompts: its first call says so, on one line, exit 2, before training
    path = write("no-scores", teacher={"model": "teacher"})
    result = cli("distill", str(path), "--no-progress")
    assert result.returncode == 2 and "cannot score prompts" in one_line(result.stderr)
    assert not (tmp_path / "no-scores" / "student-kd" / "train_metrics.json").exists()
    # the rest are refused before any call at all (in process: the exit code of a UserError is the CLI's)
    before = _teacher_requests(served)
    with pytest.raises(UserError, match="kd.on_policy.lmbda"):
        load_config(write("lmbda", on_policy={"lmbda": 1.5}))
    words_dir = tmp_path / "word-tokenizer"
    _word_level_tokenizer().save_pretrained(words_dir)
    cfg = load_config(write("words", teacher={"tokenizer": str(words_dir)}, on_policy={"min_aligned": 0.9}))
    with pytest.raises(UserError, match="teacher.tokenizer: the teacher's tokenizer aligns only") as err:
        distill(cfg, progress=False)
    assert "\n" not in str(err.value)
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():  # samples from vLLM, here
        with pytest.raises(UserError, match="kd.on_policy.sampler: 'vllm' needs") as err:
            distill(load_config(write("vllm", on_policy={"sampler": "vllm"})), progress=False)
        assert "\n" not in str(err.value)
    assert _teacher_requests(served) == before
    assert not (tmp_path / "words" / "student-kd").exists()
    assert not (tmp_path / "vllm").exists()


# --------------------------------------------------------------------------- Lion's imitation


def test_lion_imitation_on_policy_trains_on_the_students_samples_and_the_teachers_answers(served, tmp_path):
    from lionkd.config import RunConfig
    from lionkd.lion.imitation import train
    from lionkd.records import Instruction, Response
    from lionkd.store import Store

    config = _distill_config(tmp_path, served.base_url)
    cfg = RunConfig.model_validate({
        "run_dir": str(tmp_path / "lion"), "teacher": config["teacher"], "student": config["student"],
        "lion": {"imitation": "on_policy"}, "kd": {"on_policy": config["kd"]["on_policy"]}})
    instructions = [Instruction(text=q) for q in EXAMPLES]
    answers = {i.id: Response(i.id, "teacher", "t", 1, "the quick fox") for i in instructions}
    with Store.open_run(cfg.run_dir) as store:
        info = train(cfg, store, instructions, answers, 1, show_progress=False, teacher_system="Answer briefly.")
        calls = sum(r["calls"] for r in store.usage() if r["role"] == "teacher")
    op = info["on_policy"]
    assert info["examples"] == len(EXAMPLES) and not info["logit_kd"]
    assert op["samples"] > 0 and op["scoring"]["calls_sent"] == calls == op["samples"] + 1
    assert [h[0] for h in op["history"]] == [0, 1, 2]
    metrics = json.loads((cfg.run_dir / "students" / "iter-1" / "train_metrics.json").read_text())
    assert metrics["objective"] == {"ce": 1.0, "on_policy": 1.0}


def test_lion_imitation_on_policy_without_a_served_teacher_stops_before_any_work(tmp_path):
    from lionkd.config import RunConfig
    from lionkd.lion.loop import run_lion

    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "lion"), "lion": {"imitation": "on_policy"},
                                    "teacher": {"backend": "sandbox", "model": "teacher"}})
    with pytest.raises(UserError, match="lion.imitation: 'on_policy' needs a served teacher"):
        run_lion(cfg, progress=False)
    from lionkd.store import Store

    with Store.open_run(tmp_path / "lion") as store:  # nothing was done or asked
        assert store.stages() == [] and store.usage() == []
