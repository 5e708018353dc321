"""A transformers backend that can also hand out its reply while it is generated (`lionkd serve`'s streams).

`stream_text(request)` yields pieces of text as the model writes them, then the finished `GenResult`,
which is exactly what `generate` would have answered (greedy, or sampled with the same per-request
seeded noise). Only a plain request streams this way - one sample, no beams, no logprobs; the server
sends any other one in pieces once it is generated. Text that could be the start of a stop string is
held back until it is known not to be one, so a stop string is never sent. A stream whose reader stops
(a client that disconnected) ends its generation at the next token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch

from .base import GenRequest, GenResult
from .hf import HFBackend


class _Pieces:
    """A transformers streamer (put/end, called in the generating thread) feeding an asyncio queue."""

    def __init__(self, backend: StreamingHFBackend, request: GenRequest, loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue[str | None]) -> None:
        self.backend, self.request, self.loop, self.queue = backend, request, loop, queue
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.finished = False
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # a stop string may still be coming
        self.cancelled = False  # set when nobody reads the stream any more (the client went away)

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled:  # ends generate() in its thread: the model is free for the next request
            raise _StreamCancelled
        if not self.prompt_seen:  # generate hands the prompt over first
            self.prompt_seen = True
            return
        if self.finished:
            return
        for token in value.reshape(-1).tolist():
            if token in self.backend.eos_ids:
                self.finished = True
                break
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


class _StreamCancelled(Exception):
    """Raised inside generate() by the streamer of a stream whose reader has gone."""


class StreamingHFBackend(HFBackend):
    async def stream_text(self, request: GenRequest) -> AsyncIterator[str | GenResult]:
        """Pieces of the reply as they are generated, then the whole `GenResult` (see the module doc)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        prompt = self.encode(request)
        pieces = _Pieces(self, request, loop, queue)
        done: dict[str, Any] = {}

        def work() -> None:
            try:
                done["result"] = self._run([request], [prompt], streamer=pieces)[0]
            except BaseException as exc:  # handed to the event loop's side
                done["error"] = exc
            finally:
                pieces.end()

        thread = threading.Thread(target=work, name="lionkd-stream", daemon=True)
        thread.start()
        try:
            while (piece := await queue.get()) is not None:
                yield piece
        finally:  # also when the reader stops early (a client that disconnected): stop generating at once
            pieces.cancelled = True
        await asyncio.to_thread(thread.join)
        if "error" in done:
            raise done["error"]
        result: GenResult = done["result"]
        text = result.choices[0].text
        if text.startswith(pieces.sent) and len(text) > len(pieces.sent):  # what was held back
            yield text[len(pieces.sent):]
        yield result
