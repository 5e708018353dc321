"""On-policy samples from a vLLM engine (`kd.on_policy.sampler: vllm`), against a stand-in for vLLM.

vLLM needs a GPU, so here a small stand-in module takes its place: an engine that holds its own copy of
the student (loaded from the student's folder, as vLLM's is), takes weights through `load_weights` and
answers greedily. What is tested is lionkd's side: the trained weights reach the engine before each new
step's samples and only then, every row keeps its seed, answers end at the stop tokens, the samples are
what the teacher scores and the student trains on, and what the sampler cannot run with is refused in one
line. `scripts/gpu_check.py` runs the same path on real vLLM.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest
import torch

from lionkd.config import OnPolicyConfig, TrainConfig, VLLMOptions
from lionkd.errors import UserError
from lionkd.kd.examples import TrainExample
from lionkd.kd.on_policy import OnPolicySetup
from lionkd.kd.on_policy_vllm import VLLMSampler, check_sampler
from lionkd.llm.cache import CachedLLM
from lionkd.llm.hf import HFBackend
from lionkd.llm.scoring import ScoringBackend, TeacherScorer
from lionkd.llm.server import ServerThread, create_app
from lionkd.llm.templates import render_prompt
from lionkd.report.on_policy_sections import on_policy_section
from llm_fakes import tiny_model, tiny_tokenizer


class FakeEngineModel:
    def __init__(self, model):
        self.model = model
        self.loads = 0

    def load_weights(self, weights):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
        self.loads += 1


class FakeLLM:
    """vLLM's `LLM` as far as the sampler uses it; its answers are its own copy's greedy ones."""

    made: list[FakeLLM] = []

    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM

        self.kwargs = kwargs
        self.environment = dict(os.environ)
        self.copy = FakeEngineModel(AutoModelForCausalLM.from_pretrained(model).eval())
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=self.copy))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))
        self.prefix_resets = 0
        self.seeds: list[int] = []
        self.outputs: list[list[int]] = []
        FakeLLM.made.append(self)

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=True):
        outs = []
        for prompt, p in zip(prompts, params, strict=True):
            self.seeds.append(p.seed)
            ids = torch.tensor([prompt["prompt_token_ids"]])
            new = self.copy.model.generate(ids, max_new_tokens=p.max_tokens, do_sample=False,
                                           pad_token_id=0)[0, ids.shape[1]:].tolist()
            cut = next((i + 1 for i, t in enumerate(new) if t in p.stop_token_ids), len(new))
            self.outputs.append(new[:cut])  # as vLLM: up to and with the stop token
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tuple(self.outputs[-1]))]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = FakeLLM
    module.SamplingParams = types.SimpleNamespace
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.made.clear()
    return module


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("student")
    tiny_model(tok, seed=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_the_engine_takes_the_trained_weights_once_per_step_and_keeps_each_rows_seed(fake_vllm, student_dir):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    eos = {tok.eos_token_id}
    sampler = VLLMSampler(student_dir, VLLMOptions(gpu_memory_utilization=0.3), max_new_tokens=5, temperature=1.0,
                          stop_ids=eos)
    engine = FakeLLM.made[-1]
    assert engine.kwargs["distributed_executor_backend"] == "external_launcher"  # in this process
    assert engine.environment["WORLD_SIZE"] == "1" and "WORLD_SIZE" not in os.environ  # for its start only
    assert engine.kwargs["gpu_memory_utilization"] == 0.3
    prompts = [tok("add 12 and 30")["input_ids"], tok("reverse the word lion")["input_ids"]]

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)  # the training moved the student away from its folder
    rows = sampler(model, prompts, [11, 22], step=4)
    trained = {n: p.clone() for n, p in model.named_parameters()}
    for name, p in engine.copy.model.named_parameters():
        assert torch.equal(p, trained[name]), name
    assert engine.seeds == [11, 22] and engine.copy.loads == 1 and engine.prefix_resets == 1
    assert rows == engine.outputs and all(len(row) <= 5 for row in rows)

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    sampler(model, prompts[:1], [33], step=4)  # the same step: the samples come from the same weights
    assert engine.copy.loads == 1
    sampler(model, prompts[:1], [44], step=5)
    assert engine.copy.loads == 2
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in engine.copy.model.named_parameters())


@pytest.fixture(scope="module")
def served():
    tok = tiny_tokenizer()
    with ServerThread(create_app({"t": HFBackend(tiny_model(tok, seed=1), tokenizer=tok)})) as srv:
        yield srv


def test_on_policy_training_samples_from_the_engine_and_trains_on_its_samples(fake_vllm, student_dir, served,
                                                                                tmp_path, monkeypatch):
    from lionkd.kd import train
    from lionkd.kd.job import TrainJob
    from lionkd.kd.train import train_student

    monkeypatch.setattr(train, "check_sampler", lambda settings, lora: None)  # no GPU here
    tok = tiny_tokenizer()
    examples = [TrainExample(target="the quick fox", prompt=p) for p in ("add 12 and 30", "sort the list 3 1 2")]
    scored = []
    scorer = TeacherScorer(CachedLLM(ScoringBackend("t", base_url=served.base_url), None, role="teacher"), 4)
    score = scorer.score
    monkeypatch.setattr(scorer, "score", lambda pairs: scored.extend(text for _, text in pairs) or score(pairs))
    setup = OnPolicySetup(OnPolicyConfig(max_new_tokens=6, min_aligned=0.0, sampler="vllm"), scorer,
                          {e.id: render_prompt(tok, e.prompt_messages(), "alpaca") for e in examples})
    settings = TrainConfig(batch_size=2, max_steps=3, logging_steps=1, save_steps=100, learning_rate=1e-3)
    metrics = train_student(TrainJob(str(student_dir), examples, tmp_path / "s", settings=settings,
                                     template="alpaca", objective={"on_policy": 1.0}, progress=False,
                                     on_policy=setup))
    engine = FakeLLM.made[-1]
    assert metrics["steps"] == 3 and metrics["on_policy"]["samples"] == 6
    assert engine.copy.loads == 3  # the weights of each step, before its samples
    assert len(engine.seeds) == 6 and len(set(engine.seeds)) == 6
    expected = [tok.decode(out, skip_special_tokens=True) for out in engine.outputs]
    assert scored == expected  # the teacher scored the engine's samples, not HF generate's
    # the report says what wrote the samples
    section = on_policy_section([types.SimpleNamespace(label="kd", metrics=metrics)])
    assert section.tables[0].rows[0][:3] == ["kd", "vllm", 6]


@pytest.mark.parametrize(("case", "message"), [
    ("no vllm", "kd.on_policy.sampler: 'vllm' needs vLLM installed"),
    ("no gpu", "kd.on_policy.sampler: 'vllm' needs a GPU"),
    ("lora", "kd.on_policy.sampler: 'vllm' does not take a LoRA student"),
    ("tp", "kd.on_policy.vllm.tensor_parallel_size"),
])
def test_what_the_vllm_sampler_cannot_run_with_is_one_line(case, message, fake_vllm, monkeypatch):
    if case == "no vllm":
        monkeypatch.delitem(sys.modules, "vllm")
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: case != "no gpu")
    settings = OnPolicyConfig(sampler="vllm", vllm=VLLMOptions(tensor_parallel_size=2 if case == "tp" else 1))
    with pytest.raises(UserError, match=message) as err:
        check_sampler(settings, {"r": 8} if case == "lora" else None)
    assert "\n" not in str(err.value)
    check_sampler(settings.model_copy(update={"sampler": "hf"}), None)  # HF's generate needs none of it


def test_a_student_in_memory_is_refused_by_the_vllm_sampler(fake_vllm):
    tok = tiny_tokenizer()
    with pytest.raises(UserError, match="loads the student from its folder"):
        VLLMSampler(tiny_model(tok), VLLMOptions(), max_new_tokens=4, temperature=1.0, stop_ids={0})
