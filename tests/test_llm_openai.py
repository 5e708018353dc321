"""OpenAIBackend's wire format: parameters sent, replies and logprobs mapped, results as completed."""

from __future__ import annotations

import asyncio

from lionkd.llm.base import GenRequest
from lionkd.llm.openai_backend import OpenAIBackend
from llm_fakes import FakeOpenAI


def test_parameters_reach_the_wire():
    with FakeOpenAI() as fake:
        b = OpenAIBackend("m", base_url=fake.base_url, api_key="k")
        b.generate([
            GenRequest.chat([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], temperature=0.2,
                            top_p=0.9, max_tokens=7, n=2, stop=("\n\n",), seed=11, logprobs=3),
            GenRequest(prompt="p", logprobs=0),
        ])
        chat, completion = sorted(fake.bodies, key=lambda body: "messages" in body, reverse=True)
        assert chat["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        assert {k: chat[k] for k in ("model", "temperature", "top_p", "max_tokens", "n", "stop", "seed",
                                     "logprobs", "top_logprobs")} == {
            "model": "m", "temperature": 0.2, "top_p": 0.9, "max_tokens": 7, "n": 2, "stop": ["\n\n"], "seed": 11,
            "logprobs": True, "top_logprobs": 3}
        assert completion["prompt"] == "p" and completion["logprobs"] == 0 and "seed" not in completion
        assert fake.auth[0] == "Bearer k"


def test_replies_usage_and_logprobs_are_mapped():
    with FakeOpenAI() as fake:
        b = OpenAIBackend("m", base_url=fake.base_url)
        chat, plain = b.generate([GenRequest.chat([{"role": "user", "content": "hi there"}], n=2, logprobs=2),
                                  GenRequest(prompt="go", logprobs=1)])
        assert [c.text for c in chat.choices] == ["reply 0: hi there", "reply 1: hi there"]
        assert chat.prompt_tokens == 2 and chat.completion_tokens == 8
        tokens = chat.choices[0].logprobs
        assert "".join(t.token for t in tokens) == chat.text
        assert tokens[0].logprob == -0.1 and tokens[0].top == [("reply", -0.1), ("alt1", -1.1)]
        assert plain.text == "reply 0: go" and [t.token for t in plain.choices[0].logprobs] == ["reply", " 0:", " go"]
        assert plain.choices[0].logprobs[2].top == [(" go", -0.30000000000000004)]
        assert b.generate([GenRequest(prompt="x")])[0].choices[0].logprobs is None  # not asked, not given


def test_results_come_back_as_they_complete():
    with FakeOpenAI(delay_s=lambda content: 0.4 if content == "slow" else 0.0) as fake:
        b = OpenAIBackend("m", base_url=fake.base_url, concurrency=4)

        async def order() -> list[int]:
            await b.agenerate([GenRequest(prompt="warm")])  # the first batch starts with one probe
            return [i async for i, _ in b.stream([GenRequest(prompt=p) for p in ("slow", "a", "b", "c")])]

        assert asyncio.run(order())[-1] == 0
