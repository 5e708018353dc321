"""The one interface every model sits behind.

A backend turns a batch of `GenRequest`s into `GenResult`s and hands each result back as soon as it
is done, so callers can persist results one by one. Backends know nothing of roles (teacher,
referee, generator, student): a role is a backend plus a prompt, and lives in the pipelines.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclass(frozen=True)
class GenRequest:
    """One generation request: chat `messages` or a plain `prompt` (exactly one of them)."""

    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...) - hashable
    prompt: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; 0: chosen token only; k: plus top-k alternatives
    num_beams: int = 1  # honoured by local backends; API backends ignore it

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("GenRequest needs exactly one of messages or prompt")
        if self.n < 1:
            raise ValueError("GenRequest.n must be >= 1")

    @classmethod
    def chat(cls, messages: Sequence[Message], **params: Any) -> GenRequest:
        return cls(messages=tuple((m["role"], m["content"]) for m in messages), **params)

    def message_dicts(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages or ()]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["messages"] = self.message_dicts() if self.messages is not None else None
        d["stop"] = list(self.stop)
        return d


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)  # best first, may include `token`


@dataclass
class Choice:
    text: str
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    logprobs: list[TokenLogprob] | None = None


def choice_from_dict(data: dict[str, Any]) -> Choice:
    logprobs = data.get("logprobs")
    return Choice(
        text=data["text"],
        finish_reason=data.get("finish_reason", "stop"),
        logprobs=None if logprobs is None else [
            TokenLogprob(t["token"], t["logprob"], [(a, b) for a, b in t.get("top", [])]) for t in logprobs
        ],
    )


@dataclass
class GenResult:
    """The outcome of one request: `n` choices, or an error after retries."""

    choices: list[Choice] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when the request finally failed; choices are then empty
    cached: bool = False  # served from the call cache, nothing was sent

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (for the call cache and the HTTP server)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenResult:
        return cls(
            choices=[choice_from_dict(c) for c in data.get("choices", [])],
            prompt_tokens=data.get("prompt_tokens", 0),
            completion_tokens=data.get("completion_tokens", 0),
            error=data.get("error"),
            cached=data.get("cached", False),
        )

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""


class Backend(abc.ABC):
    """A model that generates. Subclasses implement `stream`; `generate` is derived."""

    kind: str = "abstract"  # "openai" | "hf" | "vllm" | "sandbox"

    def __init__(self, model: str) -> None:
        self.model = model

    @abc.abstractmethod
    def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        """Yield (index into `requests`, result) for every request, in order of completion."""

    async def agenerate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        out: list[GenResult | None] = [None] * len(requests)
        async for i, res in self.stream(requests):
            out[i] = res
        return out  # type: ignore[return-value]

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        return asyncio.run(self.agenerate(requests))

    def release(self) -> None:  # noqa: B027 - optional hook
        """Free the memory a local model holds (before a training stage); the backend is unusable after."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections or models."""
