"""The backends by name: an endpoint's `backend` (and the few names lionkd uses itself) maps to its class,
imported only when it is asked for, so a run that never touches vLLM or torch never imports them.

Every backend class makes itself from an endpoint (`from_endpoint`); `make_backend` is the one way
from a config to a backend.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from ..config import EndpointConfig
    from .base import Backend

BACKENDS: dict[str, str] = {
    "openai": "lionkd.llm.openai_backend:OpenAIBackend",  # any OpenAI-compatible HTTP endpoint
    "hf": "lionkd.llm.hf:HFBackend",  # transformers, in this process
    "hf_streaming": "lionkd.llm.hf_streaming:StreamingHFBackend",  # the same, streaming text as it is made
    "vllm": "lionkd.llm.vllm_backend:VLLMBackend",  # a vLLM engine, in this process
    "sandbox": "lionkd.llm.sandbox_backend:SandboxBackend",  # the offline task world's programs
}


def backend_class(name: str) -> type[Backend]:
    """The class registered under `name`, imported now."""
    if name not in BACKENDS:
        raise UserError(f"backend: unknown backend '{name}' (known: {', '.join(BACKENDS)})")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(endpoint: EndpointConfig, **overrides: Any) -> Backend:
    """The backend an endpoint names; `overrides` replace constructor options taken from the endpoint."""
    return backend_class(endpoint.backend).from_endpoint(endpoint, **overrides)  # type: ignore[attr-defined]
