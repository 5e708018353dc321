"""The request bodies the server reads (chat and text completions, in OpenAI's format) and the error it
answers with (`APIError`, OpenAI's error body)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..base import GenRequest

DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    num_beams: int = Field(1, ge=1, le=64)  # an extension for local models

    def params(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "max_tokens": self.max_tokens or DEFAULT_MAX_TOKENS,
            "n": self.n, "stop": tuple(stop), "seed": self.seed, "num_beams": self.num_beams,
        }

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


ROLES = ("system", "user", "assistant")  # what the chat templates render; "developer" is OpenAI's new "system"


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role == "developer":
            return "system"
        if role not in ROLES:
            raise ValueError(f"unknown role '{role}' (this server reads {', '.join(ROLES)} and developer)")
        return role

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def request(self) -> GenRequest:
        params = self.params()
        params["max_tokens"] = self.max_completion_tokens or params["max_tokens"]
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return GenRequest.chat([{"role": m.role, "content": m.text()} for m in self.messages],
                               logprobs=logprobs, **params)


class CompletionBody(_Body):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=0)  # 0 only to score a prompt (echo)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's prompt scoring (see `llm/scoring.py`)
    return_token_ids: bool = False

    @property
    def scores_prompt(self) -> bool:
        return self.prompt_logprobs is not None or (self.echo and self.logprobs is not None)

    def requests(self) -> list[GenRequest]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        return [GenRequest(prompt=p, logprobs=self.logprobs, **self.params()) for p in prompts]


async def parse_body(request: Request, schema: type[BaseModel]) -> Any:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise APIError(400, f"'{where}': {err['msg']}") from None
