"""`lionkd serve`'s app on real HTTP: lionkd's client and the raw openai SDK against a tiny local model."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from lionkd.errors import UserError
from lionkd.llm.base import Backend, Choice, GenRequest, GenResult
from lionkd.llm.hf import HFBackend
from lionkd.llm.openai_backend import OpenAIBackend
from lionkd.llm.server import ServerThread, build_models, create_app
from llm_fakes import tiny_model_dir

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 12 and 30"}]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return HFBackend(str(tiny_model_dir(tmp_path_factory.mktemp("student"))), batch_size=8)


@pytest.fixture(scope="module")
def server(student):
    with ServerThread(create_app({"student": student})) as running:
        yield running


def client(server, **kw) -> OpenAIBackend:
    return OpenAIBackend("student", base_url=server.base_url, max_retries=0, **kw)


def test_chat_and_completions_through_lionkds_client(server, student):
    chat = GenRequest.chat(MESSAGES, temperature=0, max_tokens=6, logprobs=2)
    plain = GenRequest(prompt="the quick brown", temperature=0, max_tokens=5, logprobs=1)
    over_http = client(server).generate([chat, plain])
    direct = student.generate([chat, plain])
    for remote, local in zip(over_http, direct, strict=True):
        assert remote.ok, remote.error
        assert remote.text == local.text
        assert remote.choices[0].finish_reason == local.choices[0].finish_reason
        assert (remote.prompt_tokens, remote.completion_tokens) == (local.prompt_tokens, local.completion_tokens)
        assert [t.token for t in remote.choices[0].logprobs] == [t.token for t in local.choices[0].logprobs]
        assert [t.logprob for t in remote.choices[0].logprobs] == pytest.approx(
            [t.logprob for t in local.choices[0].logprobs])
        remote_top, local_top = remote.choices[0].logprobs[0].top, local.choices[0].logprobs[0].top
        assert [a for a, _ in remote_top] == [a for a, _ in local_top]
        assert [b for _, b in remote_top] == pytest.approx([b for _, b in local_top])


def test_sampling_n_and_seed(server):
    req = GenRequest.chat(MESSAGES, temperature=1.0, max_tokens=6, n=3, seed=3)
    first, again = client(server).generate([req, req])
    assert len(first.choices) == 3 and [c.text for c in first.choices] == [c.text for c in again.choices]


def test_streaming_with_the_raw_sdk(server):
    sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    whole = sdk.chat.completions.create(model="student", messages=MESSAGES, temperature=0, max_tokens=6,
                                        logprobs=True, top_logprobs=2)
    chunks = list(sdk.chat.completions.create(
        model="student", messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole.choices[0].logprobs.content]
    assert all(len(t.top_logprobs) == 2 for t in streamed)
    assert b"".join(bytes(t.bytes) for t in streamed).decode(errors="replace") == text  # split characters too
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    legacy = sdk.completions.create(model="student", prompt="the quick", temperature=0, max_tokens=4, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text and len(lp.top_logprobs[0]) == 2


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "student", "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_models_errors_and_status_codes(server):
    url = server.base_url
    assert httpx.get(f"{url}/models").json()["data"][0]["id"] == "student"
    missing = httpx.post(f"{url}/chat/completions", json={"model": "nope", "messages": MESSAGES})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    not_json = httpx.post(f"{url}/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    no_messages = httpx.post(f"{url}/chat/completions", json={"model": "student"})
    assert no_messages.status_code == 400 and "messages" in no_messages.json()["error"]["message"]
    bad_n = httpx.post(f"{url}/completions", json={"model": "student", "prompt": "x", "n": 0})
    assert bad_n.status_code == 400
    with pytest.raises(UserError, match="404"):  # lionkd's client fails fast on an unknown model
        OpenAIBackend("nope", base_url=url).generate([GenRequest(prompt="x")])


class Recorder(Backend):
    """A fake model that remembers its batches and takes 50 ms per batch."""

    kind = "fake"

    def __init__(self) -> None:
        super().__init__("recorder")
        self.batches: list[int] = []

    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        self.batches.append(len(requests))
        await asyncio.sleep(0.05)
        for i, r in enumerate(requests):
            yield i, GenResult([Choice(f"echo {r.prompt}")], 1, 1)


def test_bearer_key_and_micro_batching():
    recorder = Recorder()
    with ServerThread(create_app({"fake": recorder}, api_key="s3cret")) as srv:
        assert httpx.get(f"{srv.base_url}/models").status_code == 401
        wrong = httpx.get(f"{srv.base_url}/models", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(UserError, match="401"):
            OpenAIBackend("fake", base_url=srv.base_url, api_key="nope").generate([GenRequest(prompt="x")])
        results = OpenAIBackend("fake", base_url=srv.base_url, api_key="s3cret", concurrency=16).generate(
            [GenRequest(prompt=f"p{i}") for i in range(16)])
        assert [r.text for r in results] == [f"echo p{i}" for i in range(16)]
        assert sum(recorder.batches) == 16 and len(recorder.batches) < 16 and max(recorder.batches) > 1


def test_sandbox_models_are_served():
    with ServerThread(create_app(build_models(None, sandbox=True))) as srv:
        names = {m["id"] for m in httpx.get(f"{srv.base_url}/models").json()["data"]}
        assert names == {"teacher", "referee", "generator"}
        reply = OpenAIBackend("teacher", base_url=srv.base_url).generate(
            [GenRequest.chat([{"role": "user", "content": "What is 2 + 3?"}], temperature=0)])[0]
        assert reply.ok and reply.text
    with pytest.raises(UserError, match="MODEL_DIR"):
        build_models(None)


def test_lionkd_serve_command():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"LIONKD_SERVE_KEY": "k-123"}
    cmd = [sys.executable, "-m", "lionkd", "serve", "--sandbox", "--port", str(port), "--api-key-env", "LIONKD_SERVE_KEY"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            try:
                reply = httpx.get(f"{url}/models", headers={"authorization": "Bearer k-123"}, timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        assert {m["id"] for m in reply.json()["data"]} == {"teacher", "referee", "generator"}
        assert httpx.get(f"{url}/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    missing = subprocess.run([sys.executable, "-m", "lionkd", "serve"], capture_output=True, text=True)
    assert missing.returncode == 2 and "MODEL_DIR" in missing.stderr


def test_serve_a_model_folder_without_a_tokenizer_is_one_line(tmp_path):
    from llm_fakes import tiny_model, tiny_tokenizer

    tiny_model(tiny_tokenizer()).save_pretrained(tmp_path / "bare")
    result = subprocess.run([sys.executable, "-m", "lionkd", "serve", str(tmp_path / "bare"), "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and str(tmp_path / "bare") in lines[0], result.stderr


# --------------------------------------------------------------------------- limits, errors, live streams


def test_a_prompt_that_does_not_fit_the_context_is_a_400_naming_the_limit(server, student):
    limit = student.max_positions  # 256 positions in the tiny model
    fits = GenRequest(prompt="the quick brown", temperature=0, max_tokens=8)
    assert client(server).generate([fits])[0].ok
    prompt = len(student.encode(fits))
    url = f"{server.base_url}/completions"
    over = httpx.post(url, json={"model": "student", "prompt": "the quick brown", "max_tokens": limit - prompt + 1})
    assert over.status_code == 400
    error = over.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert f"maximum context length is {limit} tokens" in error["message"]
    assert f"{limit + 1} tokens ({prompt} in the prompt" in error["message"]
    long = httpx.post(f"{server.base_url}/chat/completions", json={
        "model": "student", "messages": [{"role": "user", "content": "word " * 2000}], "max_tokens": 1})
    assert long.status_code == 400 and f"at least {limit} in the prompt" in long.json()["error"]["message"]
    streamed = httpx.post(url, json={"model": "student", "prompt": "x " * 2000, "stream": True})
    assert streamed.status_code == 400  # refused before the stream starts
    refused = client(server).generate([GenRequest(prompt="word " * 2000, max_tokens=4)])[0]
    assert not refused.ok and "maximum context length" in refused.error  # lionkd's client says why


def test_unknown_routes_methods_and_roles_use_the_openai_error_body(server):
    url = server.base_url
    for response, status in ((httpx.get(f"{url}/nowhere"), 404), (httpx.get(f"{url}/chat/completions"), 405),
                             (httpx.delete(f"{url}/models"), 405)):
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    bogus = httpx.post(f"{url}/chat/completions", json={
        "model": "student", "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2})
    assert bogus.status_code == 400 and "unknown role 'wizard'" in bogus.json()["error"]["message"]
    developer = httpx.post(f"{url}/chat/completions", json={
        "model": "student", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 2, "temperature": 0})
    assert developer.status_code == 200


class Live(Backend):
    """A model whose second piece waits until the client has received the first one."""

    kind = "fake"

    def __init__(self) -> None:
        super().__init__("live")
        self.first_received = threading.Event()

    async def stream(self, requests):  # pragma: no cover - only the live path is used
        raise AssertionError("the live stream was not used")
        yield

    async def stream_text(self, request):
        yield "first "
        received = await asyncio.to_thread(self.first_received.wait, 30)
        yield "second" if received else "sent-late"
        yield GenResult([Choice("first second", "stop")], prompt_tokens=3, completion_tokens=2)


def test_a_stream_sends_each_piece_as_it_is_generated():
    live = Live()
    with ServerThread(create_app({"live": live})) as srv:
        body = {"model": "live", "messages": [{"role": "user", "content": "go"}], "stream": True,
                "stream_options": {"include_usage": True}}
        pieces, finish, usage = [], None, None
        with httpx.stream("POST", f"{srv.base_url}/chat/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        pieces.append(choice["delta"]["content"])
                        live.first_received.set()  # only now may the model go on
                    finish = choice["finish_reason"] or finish
    assert pieces == ["first ", "second"] and finish == "stop" and usage["completion_tokens"] == 2


def test_a_served_model_folder_streams_what_it_would_have_answered(tmp_path):
    from lionkd.llm.hf_streaming import StreamingHFBackend

    backend = StreamingHFBackend(str(tiny_model_dir(tmp_path / "m")), batch_size=4)
    sdk_kw = {"model": "m", "messages": MESSAGES, "max_tokens": 12}
    with ServerThread(create_app({"m": backend})) as srv:
        sdk = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
        for params in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}, {"temperature": 1.0, "seed": 7, "stop": ["e"]}):
            whole = sdk.chat.completions.create(**sdk_kw, **params)
            chunks = list(sdk.chat.completions.create(**sdk_kw, **params, stream=True,
                                                      stream_options={"include_usage": True}))
            pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
            assert "".join(pieces) == whole.choices[0].message.content, params
            assert len(pieces) > 1 or len(whole.choices[0].message.content) < 4  # pieces, not one block
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
            assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
            if "stop" in params:
                assert "e" not in "".join(pieces)
        legacy = list(sdk.completions.create(model="m", prompt="the quick", temperature=0, max_tokens=6, stream=True))
        whole_legacy = sdk.completions.create(model="m", prompt="the quick", temperature=0, max_tokens=6)
        assert "".join(c.choices[0].text for c in legacy) == whole_legacy.choices[0].text


def test_serve_on_a_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "lionkd", "serve", "--sandbox", "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port} is already in use" in lines[0] and "serving" not in result.stdout


def test_a_stream_whose_client_disconnects_stops_generating(tmp_path, monkeypatch):
    from lionkd.llm.hf_streaming import StreamingHFBackend, _StreamCancelled

    backend = StreamingHFBackend(str(tiny_model_dir(tmp_path / "m")), batch_size=4)
    backend.net.generation_config.eos_token_id = None  # it would write all max_tokens if nobody stopped it
    ended: list[str] = []
    finished = threading.Event()
    run = backend._run

    def recording_run(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        except _StreamCancelled:
            ended.append("cancelled")
            raise
        finally:
            finished.set()

    monkeypatch.setattr(backend, "_run", recording_run)
    monkeypatch.setattr(backend, "eos_ids", set())
    with ServerThread(create_app({"m": backend})) as srv:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{srv.base_url}/chat/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # the client has its first piece and goes away
        finished.wait()
        assert ended == ["cancelled"]  # generation ended at the next token, not after 200 of them
        reply = httpx.post(f"{srv.base_url}/chat/completions", json=body | {"stream": False, "max_tokens": 3},
                           timeout=60).json()
        assert reply["usage"]["completion_tokens"] == 3


def test_serve_checks_its_port_before_it_loads_a_model(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # a model that could not even be found: the port, checked first, is what the line is about
        result = subprocess.run([sys.executable, "-m", "lionkd", "serve", str(tmp_path / "no-model"), "--port",
                                 str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"127.0.0.1:{port} is already in use" in result.stderr, result.stderr


def test_concurrent_streams_are_generated_as_one_batch(tmp_path, monkeypatch):
    import lionkd.llm.hf_streaming as hf_streaming
    from lionkd.llm.hf_streaming import StreamingHFBackend

    backend = StreamingHFBackend(str(tiny_model_dir(tmp_path / "m")), batch_size=8)
    batches: list[int] = []
    run = backend._run

    def recording_run(reqs, prompts, streamer=None):
        batches.append(len(reqs))
        return run(reqs, prompts, streamer=streamer)

    monkeypatch.setattr(backend, "_run", recording_run)
    monkeypatch.setattr(hf_streaming, "BATCH_WAIT_S", 2.0)  # the window in which the six clients arrive
    prompts = [f"{k} and {k + 1}" for k in range(6)]
    with ServerThread(create_app({"m": backend})) as srv:
        sdk = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)

        def streamed(text: str) -> str:
            chunks = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                                 max_tokens=10, temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(streamed, prompts))
        assert batches == [6]  # one pass of the model for six streams, not six passes one after another
        monkeypatch.setattr(hf_streaming, "BATCH_WAIT_S", 0.0)
        for text, prompt in zip(texts, prompts, strict=True):
            alone = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=10, temperature=0)
            assert text == alone.choices[0].message.content  # a stream in a batch says what it says alone
