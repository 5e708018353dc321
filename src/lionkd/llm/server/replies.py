"""The reply bodies in OpenAI's formats: logprobs (chat's `logprobs.content[]`, the legacy lists of text
completions), `usage`, and the server-sent events of a streamed reply, live or cut from a finished one."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..base import Choice, GenResult, TokenLogprob


def _token_entry(token: str, logprob: float, raw: list[int] | None = None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")) if raw is None else raw}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's `logprobs` of a chat choice; a backend that knows its tokens' raw bytes sends those."""
    def entry(t: TokenLogprob) -> dict[str, Any]:
        top_bytes = getattr(t, "top_bytes", None) or [None] * len(t.top)
        return _token_entry(t.token, t.logprob, getattr(t, "bytes", None)) | {
            "top_logprobs": [_token_entry(a, b, raw) for (a, b), raw in zip(t.top, top_bytes, strict=True)]}

    return {"content": [entry(t) for t in tokens], "refusal": None}


def legacy_logprobs(tokens: list[TokenLogprob], start: int = 0) -> dict[str, Any]:
    offsets, at = [], start
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def usage(results: list[GenResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _pieces(choice: Choice) -> Iterator[tuple[str, list[TokenLogprob] | None]]:
    """The reply cut into stream pieces: one per token where the tokens spell the text, else words."""
    tokens = choice.logprobs
    if tokens and "".join(t.token for t in tokens) == choice.text:
        for t in tokens:
            yield t.token, [t]
        return
    words = re.findall(r"\s*\S+|\s+", choice.text)
    for i, word in enumerate(words):
        yield word, (tokens if i == 0 else None)
    if not words and tokens:
        yield "", tokens


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"




async def live_chat_events(head: dict[str, Any], pieces: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse(head | {"object": "chat.completion.chunk", "choices": choices} | extra)

    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
    async for piece in pieces:
        if isinstance(piece, GenResult):
            yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": piece.choices[0].finish_reason}])
            if include_usage:
                yield chunk([], usage=usage([piece]))
        else:
            yield chunk([{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}])
    yield _sse("[DONE]")


async def live_completion_events(
    head: dict[str, Any], pieces: AsyncIterator[Any], include_usage: bool
) -> AsyncIterator[str]:
    def chunk(items: list[dict[str, Any]], **extra: Any) -> str:
        return _sse(head | {"object": "text_completion", "choices": items} | extra)

    async for piece in pieces:
        if isinstance(piece, GenResult):
            yield chunk([{"index": 0, "text": "", "finish_reason": piece.choices[0].finish_reason, "logprobs": None}])
            if include_usage:
                yield chunk([], usage=usage([piece]))
        else:
            yield chunk([{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}])
    yield _sse("[DONE]")


async def chat_events(head: dict[str, Any], result: GenResult, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse(head | {"object": "chat.completion.chunk", "choices": choices} | extra)

    for i, c in enumerate(result.choices):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
        for piece, tokens in _pieces(c):
            yield chunk([{"index": i, "delta": {"content": piece},
                          "logprobs": chat_logprobs(tokens) if tokens else None, "finish_reason": None}])
        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])
    if include_usage:
        yield chunk([], usage=usage([result]))
    yield _sse("[DONE]")


async def completion_events(
    head: dict[str, Any], choices: list[Choice], results: list[GenResult], include_usage: bool
) -> AsyncIterator[str]:
    def chunk(items: list[dict[str, Any]], **extra: Any) -> str:
        return _sse(head | {"object": "text_completion", "choices": items} | extra)

    for i, c in enumerate(choices):
        at = 0
        for piece, tokens in _pieces(c):
            yield chunk([{"index": i, "text": piece, "finish_reason": None,
                          "logprobs": legacy_logprobs(tokens, at) if tokens else None}])
            at += len(piece)
        yield chunk([{"index": i, "text": "", "finish_reason": c.finish_reason, "logprobs": None}])
    if include_usage:
        yield chunk([], usage=usage(results))
    yield _sse("[DONE]")
