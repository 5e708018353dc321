"""Requests-per-minute and tokens-per-minute limits as token buckets.

A caller reserves what it needs at once and then sleeps off any debt, so callers are served in the
order they asked without a lock, and the bucket works across event loops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """Refills at `per_minute / 60` units per second up to `burst_s` seconds' worth."""

    def __init__(self, per_minute: float, *, burst_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if per_minute <= 0:
            raise ValueError("per_minute must be > 0")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self._clock = clock
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._updated) * self.rate)
        self._updated = now

    def reserve(self, amount: float) -> float:
        """Take `amount` (a request bigger than the bucket takes a full bucket); seconds to wait."""
        self._refill()
        self.level -= min(amount, self.capacity)
        return max(0.0, -self.level / self.rate)

    async def acquire(self, amount: float = 1.0) -> None:
        wait = self.reserve(amount)
        if wait > 0:
            await asyncio.sleep(wait)

    def correct(self, delta: float) -> None:
        """Charge `delta` more (or refund when negative) once the true cost is known."""
        self._refill()
        self.level = min(self.capacity, self.level - delta)
