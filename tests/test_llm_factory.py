"""From endpoint configs to backends; request defaults; sandbox model names."""

from __future__ import annotations

import pytest

from lionkd.config import EndpointConfig
from lionkd.errors import UserError
from lionkd.llm.cache import CachedLLM
from lionkd.llm.factory import make_backend, open_llm, request_defaults
from lionkd.llm.models import resolve_model_path
from llm_fakes import tiny_model_dir


def test_openai_endpoint_reads_its_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("LIONKD_TEST_KEY", "sk-from-env")
    endpoint = EndpointConfig(model="gpt-x", base_url="http://127.0.0.1:9/v1", api_key_env="LIONKD_TEST_KEY",
                              concurrency=5, max_retries=2, timeout_s=3, requests_per_minute=60)
    backend = make_backend(endpoint)
    assert backend.kind == "openai" and backend.model == "gpt-x" and backend.concurrency == 5
    assert backend.max_retries == 2 and backend.request_bucket is not None and backend.token_bucket is None
    assert "sk-from-env" not in repr(backend)


def test_the_openai_api_without_a_key_is_a_user_error(monkeypatch):
    monkeypatch.delenv("LIONKD_MISSING_KEY", raising=False)
    with pytest.raises(UserError, match=r"teacher\.api_key_env: .*LIONKD_MISSING_KEY"):
        open_llm(EndpointConfig(api_key_env="LIONKD_MISSING_KEY"), None, "teacher")
    local = EndpointConfig(api_key_env="LIONKD_MISSING_KEY", base_url="http://127.0.0.1:9/v1")
    assert make_backend(local).kind == "openai"  # a local server needs no key


def test_sandbox_and_hf_endpoints(tmp_path):
    llm = open_llm(EndpointConfig(backend="sandbox", model="referee", sandbox={"position_bias": 1.5}), None, "referee")
    assert isinstance(llm, CachedLLM) and llm.backend.kind == "sandbox" and llm.backend.position_bias == 1.5
    with pytest.raises(UserError, match="referee.model"):
        open_llm(EndpointConfig(backend="sandbox", model="oracle"), None, "referee")
    path = tiny_model_dir(tmp_path / "m")
    hf = make_backend(EndpointConfig(backend="hf", model=str(path), batch_size=3, dtype="float32"))
    assert hf.kind == "hf" and hf.batch_size == 3


def test_request_defaults_follow_the_endpoint():
    endpoint = EndpointConfig(temperature=0.2, top_p=0.9, max_tokens=64, seed=5, logprobs=3)
    assert request_defaults(endpoint) == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 64, "seed": 5,
                                          "logprobs": 3}


def test_model_paths():
    assert resolve_model_path("org/model") == "org/model"
    with pytest.raises(UserError, match="unknown sandbox model"):
        resolve_model_path("sandbox:nothing")
    try:
        path = resolve_model_path("sandbox:base-student")
    except UserError as exc:  # the shipped student is built by the sandbox package
        assert "python -m lionkd.sandbox.student" in str(exc)
    else:
        assert path.endswith("base-student")


def test_roles_on_one_local_model_share_one_copy_that_training_releases(tmp_path):
    from lionkd.llm.factory import RoleModels

    path = str(tiny_model_dir(tmp_path / "m"))
    local = EndpointConfig(backend="hf", model=path, api_key_env=None)
    roles = RoleModels({"teacher": local, "referee": local.model_copy(update={"temperature": 0.2}),
                        "generator": EndpointConfig(model="gpt-x", base_url="http://127.0.0.1:9/v1")}, None)
    assert set(roles._roles) == {"generator"}  # remote endpoints open at once, local models on first use
    teacher, referee = roles["teacher"], roles["referee"]
    assert teacher.backend is referee.backend and teacher.role == "teacher" and referee.role == "referee"
    net = teacher.backend.net
    roles.release_local()
    assert teacher.backend.net is None  # the copy is gone before training
    again = roles["teacher"]
    assert again.backend is not teacher.backend and again.backend.net is not net and again.backend.net is not None
