"""The batcher's two policies: which job's chunk runs next (fair share) and when the engine may take work.

How the engine is fed: a replica keeps up to `max_inflight_chunks` chunks running at once; each runs the
pipeline on its problems, and all their engine calls are in flight together, so vLLM batches requests
from every active job (it schedules sequences itself; we only keep it supplied). When a chunk finishes,
its slot is refilled at once. Which job fills it is decided round-robin: every job has its own task
stream, and `RoundRobin` hands out the active jobs starting after the one served last, so with N active
jobs each gets about 1/N of the slots, however many chunks each has queued.

`EngineGate` lets the policy watcher pause the engine between batches: `batch()` wraps each unit of
engine work (a chunk or a synchronous rewrite); `exclusive()` stops new units, waits for running ones to
finish, and holds the engine alone (for a weight reload).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager


class RoundRobin:
    """Hands out jobs in turn: each call starts after the job that was served last."""

    def __init__(self) -> None:
        self._last: str | None = None

    def order(self, jobs: Sequence[str]) -> list[str]:
        """`jobs` (sorted ids) rotated to start after the last served job."""
        if self._last is None:
            return list(jobs)
        later = [j for j in jobs if j > self._last]
        return later + [j for j in jobs if j <= self._last]

    def served(self, job: str) -> None:
        """Record that `job` got a slot."""
        self._last = job


class EngineGate:
    """Counts engine work in progress and lets one exclusive holder (a reload) wait for it to drain."""

    def __init__(self) -> None:
        self._active = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._exclusive = asyncio.Lock()
        self._busy_since: float | None = None
        self._busy_total = 0.0

    @property
    def is_open(self) -> bool:
        """Whether new work may start."""
        return self._open.is_set()

    @property
    def active(self) -> int:
        """Units of engine work running now."""
        return self._active

    async def wait_open(self) -> None:
        """Wait until new work may start."""
        await self._open.wait()

    def busy_seconds(self) -> float:
        """Seconds so far during which the engine had work."""
        running = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_total + running

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """Run one unit of engine work (waits while a reload holds the gate)."""
        await self._open.wait()
        self._active += 1
        if self._active == 1:
            self._idle.clear()
            self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
                if self._busy_since is not None:
                    self._busy_total += time.monotonic() - self._busy_since
                self._busy_since = None

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Stop new work, wait for running work to finish, hold the engine alone."""
        async with self._exclusive:
            self._open.clear()
            try:
                await self._idle.wait()
                yield
            finally:
                self._open.set()
