"""Micro-batching: requests to one model that arrive within a few milliseconds of each other become one
backend call, one batch at a time per model, so a local model runs batched generation for concurrent
clients instead of one request after another."""

from __future__ import annotations

import asyncio

from ..base import Backend, GenRequest, GenResult


class MicroBatcher:
    """Collects requests that arrive within `wait_s` (up to `max_batch`) into one backend call."""

    def __init__(self, backend: Backend, max_batch: int = 16, wait_s: float = 0.005) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._queue: asyncio.Queue[tuple[GenRequest, asyncio.Future[GenResult]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, requests: list[GenRequest]) -> list[GenResult]:
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        for req, fut in zip(requests, futures, strict=True):
            self._queue.put_nowait((req, fut))
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        assert self._queue is not None
        queue, loop = self._queue, asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:
                results = await self.backend.agenerate([req for req, _ in batch])
            except Exception as exc:  # the clients get a 500, the worker lives on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
