"""A transformers backend that can also hand out its reply while it is generated (`lionkd serve`'s streams).

`stream_text(request)` yields pieces of text as the model writes them, then the finished `GenResult`,
which is exactly what `generate` would have answered (greedy, or sampled with the same per-request
seeded noise). Only a plain request streams this way - one sample, no beams, no logprobs; the server
sends any other one in pieces once it is generated. Text that could be the start of a stop string is
held back until it is known not to be one, so a stop string is never sent. A stream whose reader stops
(a client that disconnected) ends its generation at the next token (a batch, once all its readers stopped).

Streams that arrive within a few milliseconds of each other with the same settings are generated as
one batch, as the server's micro-batcher does for other requests: sixteen clients streaming at once
share one pass of the model instead of waiting for each other.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch

from .base import GenRequest, GenResult
from .hf import HFBackend, batch_key

BATCH_WAIT_S = 0.005  # how long a stream waits for others to share its batch


class _Pieces:
    """One streamed request's text as it grows, fed token by token from the generating thread into an
    asyncio queue."""

    def __init__(self, backend: StreamingHFBackend, request: GenRequest, loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue[str | None]) -> None:
        self.backend, self.request, self.loop, self.queue = backend, request, loop, queue
        self.ids: list[int] = []
        self.sent = ""
        self.finished = False
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # a stop string may still be coming
        self.cancelled = False  # set when nobody reads the stream any more (the client went away)

    def take(self, token: int) -> None:
        if self.finished:
            return
        if token in self.backend.eos_ids:
            self.finished = True
            return
        self.ids.append(token)
        text = self.backend.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a character: wait for the rest of its bytes
            return
        cut = min((i for i in (text.find(s) for s in self.request.stop) if i >= 0), default=-1)
        ready = text[:cut] if cut >= 0 else text[: max(len(self.sent), len(text) - self.hold)]
        if cut >= 0:
            self.finished = True
        if ready.startswith(self.sent) and len(ready) > len(self.sent):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ready[len(self.sent):])
            self.sent = ready

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class _Rows:
    """A transformers streamer (put/end, called in the generating thread) for a batch of streams: each
    step's tokens, one per row, go to their row's `_Pieces`."""

    def __init__(self, rows: list[_Pieces]) -> None:
        self.rows = rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if all(row.cancelled for row in self.rows):  # ends generate() in its thread: the model is free again
            raise _StreamCancelled
        if not self.prompt_seen:  # generate hands the prompts over first
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            row.take(token)

    def end(self) -> None:
        for row in self.rows:
            row.end()


class _StreamCancelled(Exception):
    """Raised inside generate() by the streamer of a batch whose readers have all gone."""


class StreamingHFBackend(HFBackend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # streams waiting to start, by batch settings: (request, prompt, pieces, future of its GenResult)
        self._waiting: dict[tuple, list[tuple[GenRequest, list[int], _Pieces, asyncio.Future[GenResult]]]] = {}

    async def stream_text(self, request: GenRequest) -> AsyncIterator[str | GenResult]:
        """Pieces of the reply as they are generated, then the whole `GenResult` (see the module doc)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        pieces = _Pieces(self, request, loop, queue)
        done: asyncio.Future[GenResult] = loop.create_future()
        self._join(request, self.encode(request), pieces, done)
        try:
            while (piece := await queue.get()) is not None:
                yield piece
        finally:  # also when the reader stops early (a client that disconnected)
            pieces.cancelled = True
            done.add_done_callback(_quiet)
        result = await done
        text = result.choices[0].text
        if text.startswith(pieces.sent) and len(text) > len(pieces.sent):  # what was held back
            yield text[len(pieces.sent):]
        yield result

    def _join(self, request: GenRequest, prompt: list[int], pieces: _Pieces, done: asyncio.Future[GenResult]) -> None:
        """Add a stream to the batch of its settings; the batch starts when full or after BATCH_WAIT_S."""
        key = batch_key(request)
        waiting = self._waiting.setdefault(key, [])
        waiting.append((request, prompt, pieces, done))
        if len(waiting) >= self.batch_size:
            self._start(key)
        elif len(waiting) == 1:
            asyncio.get_running_loop().call_later(BATCH_WAIT_S, self._start, key)

    def _start(self, key: tuple) -> None:
        batch = self._waiting.pop(key, [])
        if not batch:
            return
        loop = asyncio.get_running_loop()
        streamer = _Rows([pieces for _, _, pieces, _ in batch])

        def work() -> None:
            try:
                results: list[GenResult] | BaseException = self._run([r for r, *_ in batch], [p for _, p, *_ in batch],
                                                                     streamer=streamer)
            except BaseException as exc:  # handed to the event loop's side
                results = exc
            finally:
                streamer.end()
            for i, (*_, done) in enumerate(batch):
                loop.call_soon_threadsafe(_settle, done, results if isinstance(results, BaseException) else results[i])

        threading.Thread(target=work, name="lionkd-stream", daemon=True).start()


def _settle(done: asyncio.Future[GenResult], outcome: GenResult | BaseException) -> None:
    if done.done():
        return
    if isinstance(outcome, BaseException):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


def _quiet(done: asyncio.Future[GenResult]) -> None:
    """Mark a stream's outcome as seen: one nobody reads any more (its client went away) is not an error."""
    if not done.cancelled():
        done.exception()
