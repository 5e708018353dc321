"""VLLMBackend: the mapping of vLLM's outputs (always), and real generation where vLLM is installed."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from lionkd.errors import UserError
from lionkd.llm.base import GenRequest
from lionkd.llm.vllm_backend import to_logprobs

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def lp(logprob: float, rank: int, text: str) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=text)


def test_logprobs_keep_the_chosen_token_and_the_best_k():
    # position 0: the sampled token (id 7, rank 3) came with the top-2; position 1: the sampled token is the best
    completion = SimpleNamespace(token_ids=[7, 4], logprobs=[
        {1: lp(-0.2, 1, " a"), 2: lp(-1.9, 2, " b"), 7: lp(-3.0, 3, " c")},
        {4: lp(-0.1, 1, "!"), 5: lp(-2.5, 2, "?")},
    ])
    tokens = to_logprobs(completion, 2)
    assert [(t.token, t.logprob) for t in tokens] == [(" c", -3.0), ("!", -0.1)]
    assert tokens[0].top == [(" a", -0.2), (" b", -1.9)] and tokens[1].top == [("!", -0.1), ("?", -2.5)]
    assert to_logprobs(SimpleNamespace(token_ids=[1], logprobs=None), 2) is None


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed")
def test_a_clear_error_without_vllm(tmp_path):
    from lionkd.llm.vllm_backend import VLLMBackend

    with pytest.raises(UserError, match="not installed"):
        VLLMBackend(str(tmp_path))


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
def test_generation_with_vllm(tmp_path):
    from lionkd.llm.vllm_backend import VLLMBackend
    from llm_fakes import tiny_model_dir

    backend = VLLMBackend(str(tiny_model_dir(tmp_path / "m")), enforce_eager=True, gpu_memory_utilization=0.2)
    chat = GenRequest.chat([{"role": "user", "content": "add 12 and 30"}], temperature=0, max_tokens=5, logprobs=2)
    sampled = GenRequest(prompt="the quick", temperature=1.0, max_tokens=5, n=3, seed=1)
    first, second = backend.generate([chat, sampled])
    assert first.ok and len(first.choices[0].logprobs) == first.completion_tokens
    assert all(len(t.top) == 2 for t in first.choices[0].logprobs)
    assert len(second.choices) == 3 and second.prompt_tokens > 0
