"""HFBackend on tiny models built from a config: batching, decoding modes, stops, logprobs, seq2seq."""

from __future__ import annotations

import asyncio
import copy
import threading

import pytest
import torch

from lionkd.llm.base import GenRequest
from lionkd.llm.hf import HFBackend
from lionkd.llm.templates import render_prompt
from llm_fakes import tiny_model, tiny_model_dir, tiny_tokenizer

PROMPTS = ["add 12 and 30", "the quick brown fox jumps over", "sort", "what is the capital of france today"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_model(tok)


def greedy(prompt: str, **params) -> GenRequest:
    return GenRequest(prompt=prompt, temperature=0, **({"max_tokens": 8} | params))


def one_by_one(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1] :]
    eos = (new == tok.eos_token_id).nonzero()
    return tok.decode(new[: eos[0, 0]] if len(eos) else new, skip_special_tokens=True)


def test_batched_greedy_equals_one_request_at_a_time(llama, tok):
    backend = HFBackend(llama, tokenizer=tok, batch_size=4)
    results = backend.generate([greedy(p) for p in PROMPTS])
    assert [r.text for r in results] == [one_by_one(llama, tok, p, 8) for p in PROMPTS]
    for p, r in zip(PROMPTS, results, strict=True):
        assert r.prompt_tokens == len(tok(p)["input_ids"])
        if r.choices[0].finish_reason == "length":
            assert r.completion_tokens == 8
        else:  # the random model happened to say EOS
            assert r.choices[0].finish_reason == "stop" and r.completion_tokens < 9


def test_finish_reason_stop_at_eos_and_at_stop_strings(llama, tok):
    base = HFBackend(llama, tokenizer=tok).generate([greedy("sort the list", max_tokens=12)])[0]
    text = base.text
    assert len(text) >= 4
    # EOS: make the model's first greedy token the end-of-sequence token
    first = tok(text, add_special_tokens=False)["input_ids"][0]
    stopped_model = copy.deepcopy(llama)
    stopped_model.generation_config.eos_token_id = first
    at_eos = HFBackend(stopped_model, tokenizer=tok).generate([greedy("sort the list", max_tokens=12)])[0]
    assert at_eos.text == "" and at_eos.choices[0].finish_reason == "stop" and at_eos.completion_tokens == 1
    # a stop string is cut off, as the OpenAI API does
    stop = text[2:4]
    cut = HFBackend(llama, tokenizer=tok).generate([greedy("sort the list", max_tokens=12, stop=(stop,))])[0]
    assert cut.text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_logprobs_are_the_models_distribution(llama, tok):
    backend = HFBackend(llama, tokenizer=tok)
    result = backend.generate([greedy("add 12 and 30", max_tokens=6, logprobs=3)])[0]
    tokens = result.choices[0].logprobs
    assert len(tokens) == 6 and "".join(t.token for t in tokens) == result.text
    for t in tokens:
        assert len(t.top) == 3 and t.top[0][1] >= t.top[1][1] >= t.top[2][1]
        assert t.logprob == pytest.approx(t.top[0][1])  # greedy picks the best token
    # the same numbers from one forward pass over the prompt and the greedy answer
    prompt = tok("add 12 and 30", return_tensors="pt")
    full = llama.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    n = prompt["input_ids"].shape[1]
    with torch.no_grad():
        logits = llama(full).logits[0].log_softmax(-1)
    expected = [logits[n - 1 + i, a].item() for i, a in enumerate(full[0, n:].tolist())]
    assert [t.logprob for t in tokens] == pytest.approx(expected, abs=1e-4)
    # each token carries the raw bytes of the generated token: together they spell the text
    assert [bytes(t.bytes) for t in tokens] == [backend.token_bytes(a) for a in full[0, n:].tolist()]
    assert b"".join(bytes(t.bytes) for t in tokens).decode(errors="replace") == result.text


def test_sampling_is_seeded_and_returns_n(llama, tok):
    backend = HFBackend(llama, tokenizer=tok)
    req = GenRequest(prompt="the quick", temperature=1.0, top_p=0.95, max_tokens=8, n=3, seed=7)
    first, again = backend.generate([req])[0], backend.generate([req])[0]
    other = backend.generate([GenRequest(prompt="the quick", temperature=1.0, max_tokens=8, n=3, seed=8)])[0]
    assert len(first.choices) == 3 and [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.text for c in first.choices] != [c.text for c in other.choices]
    assert 3 <= first.completion_tokens <= 24


def test_a_seeded_sample_does_not_depend_on_its_batch(llama, tok):
    backend = HFBackend(llama, tokenizer=tok, batch_size=8)

    def sample(prompt: str, seed: int = 7) -> GenRequest:
        return GenRequest(prompt=prompt, temperature=1.0, top_p=0.9, max_tokens=8, n=2, seed=seed)

    alone = backend.generate([sample(PROMPTS[1])])[0]
    crowd = backend.generate([sample(p) for p in PROMPTS])[1]  # other prompts, other lengths, other padding
    assert [c.text for c in alone.choices] == [c.text for c in crowd.choices]
    assert alone.choices[0].text != alone.choices[1].text or alone.choices[0].text == ""  # n draws, not copies
    others = {c.text for seed in range(1, 6) for c in backend.generate([sample(PROMPTS[1], seed)])[0].choices}
    assert len(others) > 1  # the seed matters: this is sampling, not greedy decoding


def test_beam_search_returns_n_best_beams(llama, tok):
    backend = HFBackend(llama, tokenizer=tok)
    result = backend.generate([greedy("sort the list", num_beams=4, n=2, max_tokens=6, logprobs=0)])[0]
    assert len(result.choices) == 2 and result.choices[0].text != result.choices[1].text
    for c in result.choices:
        assert c.logprobs is not None and all(t.logprob <= 0 for t in c.logprobs)
    greedy_n = backend.generate([greedy("sort the list", n=3)])[0]
    assert len({c.text for c in greedy_n.choices}) == 1 and len(greedy_n.choices) == 3


def test_chat_messages_use_the_chat_template_or_alpaca(llama, tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 12 and 30"}]
    for template in ("chat", "alpaca"):
        backend = HFBackend(llama, tokenizer=tok, template=template)
        result = backend.generate([GenRequest.chat(messages, temperature=0, max_tokens=4)])[0]
        rendered = render_prompt(tok, messages, template)
        assert rendered.startswith("<|system|>") == (template == "chat")
        assert result.prompt_tokens == len(tok(rendered, add_special_tokens=template == "alpaca")["input_ids"])


def test_encoder_decoder(tok):
    t5 = tiny_model(tok, encoder_decoder=True)
    backend = HFBackend(t5, tokenizer=tok, batch_size=4)
    batched = backend.generate([greedy(p, max_tokens=5, logprobs=1) for p in PROMPTS[:3]])
    alone = [backend.generate([greedy(p, max_tokens=5, logprobs=1)])[0] for p in PROMPTS[:3]]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert all(len(r.choices[0].logprobs) == r.completion_tokens for r in batched if r.choices[0].finish_reason == "length")


def test_loads_a_directory_in_fp32_on_cpu(tmp_path):
    path = tiny_model_dir(tmp_path / "student")
    backend = HFBackend(str(path))
    assert backend.net.dtype == torch.float32 and backend.device.type == "cpu"
    assert backend.model == str(path) and backend.kind == "hf"
    assert backend.generate([greedy("add", max_tokens=2)])[0].ok


def test_the_event_loop_stays_responsive(llama, tok, monkeypatch):
    """The model works in a thread: while it generates, the event loop runs. Shown without counting ticks
    (which a loaded machine makes few): the model waits inside generate() until the loop has run once more,
    which it could never see if generation blocked the loop."""
    backend = HFBackend(llama, tokenizer=tok)
    loop_ran = threading.Event()
    waited: list[bool] = []
    generate = llama.generate

    def generate_once_the_loop_ran(*args, **kwargs):
        loop_ran.clear()
        waited.append(loop_ran.wait(timeout=120))
        return generate(*args, **kwargs)

    monkeypatch.setattr(llama, "generate", generate_once_the_loop_ran)

    async def main() -> None:
        task = asyncio.create_task(backend.agenerate([greedy(p, max_tokens=24) for p in PROMPTS]))
        while not task.done():
            loop_ran.set()
            await asyncio.sleep(0.01)
        await task

    asyncio.run(main())
    assert waited and all(waited)


def test_batches_respect_a_token_budget(llama, tok):
    backend = HFBackend(llama, tokenizer=tok, batch_size=16, batch_tokens=60)
    requests = [greedy(p, max_tokens=10) for p in PROMPTS * 3]
    prompts = [backend.encode(r) for r in requests]
    batches = backend._plan(requests, prompts)
    assert sorted(i for b in batches for i in b) == list(range(len(requests)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(len(prompts[i]) + 10 for i in batch) <= 60
    assert len(batches) > 1 and max(map(len, batches)) > 1
    unbounded = HFBackend(llama, tokenizer=tok, batch_size=16)
    assert len(unbounded._plan(requests, prompts)) == 1
    assert [r.text for r in backend.generate(requests)] == [r.text for r in unbounded.generate(requests)]
