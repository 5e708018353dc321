"""On-policy KD with the real SmolLM2-135M-Instruct served over HTTP as the teacher.

The reverse KL the objective computes from the served teacher's scores is checked against the same
reverse KL computed in process from the teacher's full distribution; a student with another
tokenizer goes through the alignment path.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lionkd.config import OnPolicyConfig
from lionkd.kd.examples import Collator, TrainExample, encode_example
from lionkd.kd.losses import on_policy_loss
from lionkd.kd.on_policy import OnPolicySetup, collate_on_policy
from lionkd.kd.prune import prune_layers
from lionkd.llm.cache import CachedLLM
from lionkd.llm.models import resolve_model_path
from lionkd.llm.scoring import ScoringBackend, TeacherScorer
from lionkd.llm.server import ServerThread, build_models, create_app
from lionkd.llm.templates import render_prompt
from llm_fakes import tiny_model, tiny_tokenizer

QUESTIONS = ["What is 2 + 3?", "Name a colour of the sky."]


@pytest.fixture(scope="module")
def smollm():
    return resolve_model_path("smollm2-135m-instruct")  # the user's cache: converted once for every test that needs it


@pytest.fixture(scope="module")
def served(smollm):
    models = build_models(smollm, name="teacher", dtype="float32", device="cpu")
    with ServerThread(create_app(models)) as server:
        yield server, models["teacher"]


def _batch(student, tok, served_url, *, template="chat", min_aligned=0.9, top_k=5):
    examples = [TrainExample(target="", messages=[{"role": "user", "content": q}]) for q in QUESTIONS]
    teacher_tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    prompts = {e.id: render_prompt(teacher_tok, e.prompt_messages(), "chat") for e in examples}
    scorer = TeacherScorer(CachedLLM(ScoringBackend("teacher", base_url=served_url, scoring="vllm"), None), top_k)
    op = OnPolicySetup(OnPolicyConfig(max_new_tokens=10, top_k=top_k, min_aligned=min_aligned), scorer,
                       prompts, seed=1).teacher(tok, 256, template)
    features = [encode_example(tok, e, template=template) for e in examples]
    mixed = op.mix(student, features, 0)
    batch = Collator(pad_token_id=tok.pad_token_id)(mixed)
    return op, prompts, examples, mixed, batch | collate_on_policy(mixed, batch)


def test_reverse_kl_from_the_served_teacher_equals_the_in_process_one(smollm, served, tmp_path):
    server, backend = served
    prune_layers(smollm, tmp_path / "small", "first_last")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "small")
    op, prompts, examples, mixed, batch = _batch(student, tok, server.base_url)
    assert op.stats.aligned_fraction == 1.0  # one tokenizer: every sampled token has its teacher token
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["op_mask"]
    k1 = on_policy_loss(logits, mask, estimator="k1", token_ids=batch["target_ids"],
                        teacher_token_logprobs=batch["op_token_logprob"])
    topk = on_policy_loss(logits, mask, estimator="topk", teacher_ids=batch["op_ids"],
                          teacher_logprobs=batch["op_logprobs"])

    # the same, in process: the teacher's full distribution over the student's sampled tokens
    teacher = backend.net
    ratios, buckets = [], []
    for row, (e, f) in enumerate(zip(examples, mixed, strict=True)):
        sampled = f["target"][:-1]  # the end of turn is not scored
        text = tok.decode(sampled)
        ids = tok(prompts[e.id] + text)["input_ids"]
        assert ids[len(ids) - len(sampled):] == sampled
        with torch.no_grad():
            lp = teacher(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        start = len(f["prompt"]) - 1
        for j, y in enumerate(sampled):
            lp_t = lp[len(ids) - len(sampled) + j - 1]
            lq_t = logits[row, start + j].float().log_softmax(-1)
            ratios.append(float(lq_t[y] - lp_t[y]))
            # buckets: the teacher's top-k and the sampled token; a special token (the end of turn) has no
            # text to align by, so its mass is in the tail, as the served scores give it
            top = [i for i in lp_t.topk(5).indices.tolist() if i not in tok.all_special_ids]
            top = torch.tensor(top if y in top else [*top, y])
            qb = torch.cat([lq_t[top].exp(), (1 - lq_t[top].exp().sum()).reshape(1)])
            pb = torch.cat([lp_t[top].exp(), (1 - lp_t[top].exp().sum()).reshape(1)])
            buckets.append(float((qb * (qb.log() - pb.log())).sum()))
    assert int(mask.sum()) == len(ratios) > 0
    assert float(k1) == pytest.approx(sum(ratios) / len(ratios), abs=1e-4)
    assert float(topk) == pytest.approx(sum(buckets) / len(buckets), abs=1e-4)


def test_a_student_with_another_tokenizer_goes_through_the_alignment(served):
    server, _ = served
    tok = tiny_tokenizer()
    student = tiny_model(tok, seed=4)
    op, _, _, _, batch = _batch(student, tok, server.base_url, template="alpaca", min_aligned=0.0)
    share = op.stats.aligned_fraction
    assert 0.0 <= share <= 1.0 and op.stats.positions > 0
    assert int(batch["op_mask"].sum()) <= op.stats.aligned
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = on_policy_loss(logits, batch["op_mask"], estimator="topk", teacher_ids=batch["op_ids"],
                          teacher_logprobs=batch["op_logprobs"])
    assert math.isfinite(float(loss))
