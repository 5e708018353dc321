"""From an endpoint in the config to a ready backend (and the call cache in front of it).

Heavy libraries (torch models, vLLM, the sandbox) are imported only for the backend that needs them.
"""

from __future__ import annotations

from typing import Any

from ..config import EndpointConfig
from ..errors import UserError
from ..store import Store
from .base import Backend
from .cache import CachedLLM
from .models import resolve_model_path


def make_backend(endpoint: EndpointConfig) -> Backend:
    """The backend an endpoint names; the API key is read from the environment now and kept in memory only."""
    if endpoint.backend == "openai":
        from .openai_backend import OpenAIBackend

        key = endpoint.api_key()
        if key is None and endpoint.base_url is None and endpoint.api_key_env:
            raise UserError(f"api_key_env: the environment variable ${endpoint.api_key_env} is not set "
                            "(needed for the OpenAI API; set base_url for a local server)")
        return OpenAIBackend(
            endpoint.model, base_url=endpoint.base_url, api_key=key, concurrency=endpoint.concurrency,
            requests_per_minute=endpoint.requests_per_minute, tokens_per_minute=endpoint.tokens_per_minute,
            max_retries=endpoint.max_retries, timeout_s=endpoint.timeout_s,
        )
    if endpoint.backend == "hf":
        from .hf import HFBackend

        return HFBackend(resolve_model_path(endpoint.model), dtype=endpoint.dtype, device=endpoint.device,
                         batch_size=endpoint.batch_size, batch_tokens=endpoint.batch_tokens)
    if endpoint.backend == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(resolve_model_path(endpoint.model), dtype=endpoint.dtype, **endpoint.vllm.engine_args())
    if endpoint.backend == "sandbox":
        from .sandbox_backend import SandboxBackend

        opts = endpoint.sandbox
        try:
            return SandboxBackend(endpoint.model, error_rate=opts.error_rate, position_bias=opts.position_bias,
                                  malformed_rate=opts.malformed_rate)
        except ValueError as exc:
            raise UserError(f"model: {exc}") from None
    raise UserError(f"backend: unknown backend '{endpoint.backend}'")


def open_llm(endpoint: EndpointConfig, store: Store | None, role: str) -> CachedLLM:
    """The endpoint's backend behind the run's call cache, its calls booked to `role`."""
    try:
        backend = make_backend(endpoint)
    except UserError as exc:
        raise UserError(f"{role}.{exc}" if str(exc).startswith(("model", "api_key_env", "backend"))
                        else f"{role}: {exc}") from None
    return CachedLLM(backend, store, role=role)


LOCAL_BACKENDS = ("hf", "vllm")


class RoleModels:
    """A run's LLM roles behind its call cache, each booked to its role.

    Remote endpoints are opened at once, so a bad key or URL fails before any work. Local models are
    loaded on first use and shared by the roles that name the same one (three roles on one model hold
    one copy); `release_local` frees them before a training stage, and the next use loads them again.
    """

    def __init__(self, endpoints: dict[str, EndpointConfig], store: Store | None) -> None:
        self.endpoints = endpoints
        self.store = store
        self._roles: dict[str, CachedLLM] = {}
        self._local: dict[str, Backend] = {}
        for role, endpoint in endpoints.items():
            if endpoint.backend not in LOCAL_BACKENDS:
                self._roles[role] = open_llm(endpoint, store, role)

    def __getitem__(self, role: str) -> CachedLLM:
        if role not in self._roles:
            endpoint = self.endpoints[role]
            key = endpoint.model_dump_json(include={"backend", "model", "dtype", "device", "batch_size", "batch_tokens", "vllm"})
            if key not in self._local:
                self._local[key] = open_llm(endpoint, self.store, role).backend
            self._roles[role] = CachedLLM(self._local[key], self.store, role=role)
        return self._roles[role]

    def release_local(self) -> None:
        for backend in self._local.values():
            backend.release()
        self._local.clear()
        self._roles = {r: llm for r, llm in self._roles.items() if self.endpoints[r].backend not in LOCAL_BACKENDS}


def request_defaults(endpoint: EndpointConfig) -> dict[str, Any]:
    """The endpoint's sampling settings as `GenRequest` keyword arguments."""
    return {
        "temperature": endpoint.temperature, "top_p": endpoint.top_p, "max_tokens": endpoint.max_tokens,
        "seed": endpoint.seed, "logprobs": endpoint.logprobs,
    }
