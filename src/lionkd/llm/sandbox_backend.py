"""The sandbox world behind the common `Backend` interface: teacher, referee and generator by name.

Replies are deterministic: every random choice is seeded from a hash of the request content, the
sample index and the backend seed, so a resumed run gets exactly the replies a first run got.
Usage counts whitespace-separated words as tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..sandbox import oracle
from .base import Backend, Choice, GenRequest, GenResult

if TYPE_CHECKING:
    from ..config import EndpointConfig

MODELS = ("teacher", "referee", "generator")


def _words(text: str) -> int:
    return len(text.split())


def _last_user_message(request: GenRequest) -> str:
    if request.prompt is not None:
        return request.prompt
    users = [content for role, content in request.messages or () if role == "user"]
    return users[-1] if users else ""


def _cut(text: str, request: GenRequest) -> tuple[str, str]:
    """Apply stop strings and the max_tokens word budget; returns (text, finish_reason)."""
    for stop in request.stop:
        if stop and stop in text:
            text = text[: text.index(stop)]
    words = text.split()
    if len(words) > request.max_tokens:
        return " ".join(words[: request.max_tokens]), "length"
    return text, "stop"


class SandboxBackend(Backend):
    """An exact program playing "teacher", "referee" or "generator" (see `lionkd.sandbox.oracle`).

    error_rate: the teacher's chance of a plausible wrong answer. position_bias: points by which the
    referee favours Assistant 1 (see `oracle.biased`). malformed_rate: the referee's chance of an
    unparseable reply.
    """

    kind = "sandbox"
    models = MODELS  # the programs it can play

    def __init__(
        self,
        model: str,
        *,
        seed: int = 0,
        error_rate: float = 0.0,
        position_bias: float = 0.0,
        malformed_rate: float = 0.0,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown sandbox model {model!r}; valid models: {', '.join(MODELS)}")
        for name, rate in (("error_rate", error_rate), ("malformed_rate", malformed_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {rate}")
        super().__init__(model)
        self.seed = seed
        self.error_rate = error_rate
        self.position_bias = position_bias
        self.malformed_rate = malformed_rate

    @classmethod
    def from_endpoint(cls, endpoint: EndpointConfig, **overrides: Any) -> SandboxBackend:
        """The sandbox program the endpoint names, with the endpoint's `sandbox` knobs."""
        opts = endpoint.sandbox
        options: dict[str, Any] = {"error_rate": opts.error_rate, "position_bias": opts.position_bias,
                                   "malformed_rate": opts.malformed_rate}
        try:
            return cls(endpoint.model, **(options | overrides))
        except ValueError as exc:
            raise UserError(f"model: {exc}") from None

    def _rng(self, request: GenRequest, index: int) -> random.Random:
        content = request.message_dicts() if request.messages is not None else request.prompt
        key = json.dumps([self.model, content, request.seed, index, self.seed], sort_keys=True)
        return random.Random(hashlib.sha256(key.encode()).hexdigest())

    def reply(self, request: GenRequest, index: int = 0) -> str:
        """The uncut reply text of sample `index`."""
        rng = self._rng(request, index)
        text = _last_user_message(request)
        if self.model == "teacher":
            return oracle.teacher_reply(text, rng, self.error_rate)
        if self.model == "referee":
            return oracle.referee_reply(text, rng, self.position_bias, self.malformed_rate)
        return oracle.generator_reply(text, rng)

    def result(self, request: GenRequest) -> GenResult:
        choices = [Choice(*_cut(self.reply(request, i), request)) for i in range(request.n)]
        prompt = (
            request.prompt if request.prompt is not None else " ".join(c for _, c in request.messages or ())
        )
        return GenResult(
            choices=choices,
            prompt_tokens=_words(prompt),
            completion_tokens=sum(_words(c.text) for c in choices),
        )

    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        for i, request in enumerate(requests):
            yield i, self.result(request)
