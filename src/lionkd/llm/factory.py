"""From an endpoint in the config to a ready backend behind the call cache, and the roles of a run.

Backends are made by the registry (`registry.make_backend`), which imports heavy libraries (torch
models, vLLM) only for the backend that needs them.
"""

from __future__ import annotations

from typing import Any

from ..config import EndpointConfig
from ..errors import UserError
from ..store import Store
from .base import Backend
from .cache import CachedLLM
from .registry import make_backend


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
