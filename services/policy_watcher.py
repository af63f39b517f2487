"""The weights watcher: follows the trainer's policy version and reloads the engine between batches.

The trainer writes `checkpoints/v{N}/`, then a `READY` marker, then sets the `policy` hash (version, path)
and publishes on `policy:events`. The watcher listens on that channel and also polls the hash (events are
fire-and-forget, so a missed one is caught by the next poll). On a newer version it closes the engine gate
(no new chunks start), waits for running batches to finish, reloads, and reopens: every example made
afterwards carries the new version. A folder without READY, or weights that fail to load, are refused;
the old weights keep serving and that (version, path) is not tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from pathlib import Path
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.wire import PolicyStatus, ReloadRecord
from services.engine import Engine
from services.metrics import Metrics
from services.scheduler import EngineGate
from shared.keys import Keys

log = logging.getLogger("mindgap.policy")

READY_MARKER = "READY"
STOP_CHECK_S = 1.0  # longest wait for an event before looking at the stop flag (and maybe polling)
Source = Literal["startup", "event", "poll", "admin"]


def version_from_path(path: str) -> int | None:
    """The N of a checkpoint folder named `v{N}`, or None."""
    match = re.fullmatch(r"v(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


class PolicyWatcher:
    """Tracks the served policy version and reloads the engine when the trainer publishes a new one."""

    def __init__(
        self,
        r: aioredis.Redis,
        keys: Keys,
        engine: Engine,
        gate: EngineGate,
        metrics: Metrics,
        poll_s: float,
        history: int = 100,
    ) -> None:
        self.r = r
        self.keys = keys
        self.engine = engine
        self.gate = gate
        self.metrics = metrics
        self.poll_s = poll_s
        self.version = 0  # the weights the engine started with
        self.path: str | None = None
        self.history: deque[ReloadRecord] = deque(maxlen=history)
        self._refused: set[tuple[int, str]] = set()
        self._lock = asyncio.Lock()
        self._reloading = False
        self._stopping = asyncio.Event()

    def status(self) -> PolicyStatus:
        """The served version and the reload history."""
        return PolicyStatus(version=self.version, path=self.path, reloading=self._reloading, history=list(self.history))

    async def check(self, source: Source) -> ReloadRecord | None:
        """Reload if the `policy` hash names a newer version than the one served."""
        raw = await self.r.hmget(self.keys.policy, ["version", "path"])
        if raw[0] is None or raw[1] is None:
            return None
        version = int(raw[0])
        path = raw[1].decode() if isinstance(raw[1], bytes) else str(raw[1])
        if version <= self.version or (version, path) in self._refused:
            return None
        return await self.reload(path, version, source)

    async def reload(self, path: str, version: int | None, source: Source) -> ReloadRecord:
        """Load the checkpoint at `path` as `version` between batches; refuse it without READY or on failure."""
        async with self._lock:
            if version is None:
                version = version_from_path(path)
                if version is None:
                    version = self.version + 1
            start = time.monotonic()
            outcome: Literal["loaded", "refused", "failed"] = "loaded"
            error: str | None = None
            if not (Path(path) / READY_MARKER).is_file():
                outcome, error = "refused", f"{path} has no {READY_MARKER} marker (checkpoint incomplete)"
            else:
                self._reloading = True
                try:
                    async with self.gate.exclusive():
                        start = time.monotonic()
                        await self.engine.reload(path)
                except Exception as exc:  # the engine keeps its old weights
                    outcome, error = "failed", f"{type(exc).__name__}: {exc}"
                finally:
                    self._reloading = False
            record = ReloadRecord(
                time=time.time(),
                version=version,
                path=path,
                duration_s=round(time.monotonic() - start, 3),
                outcome=outcome,
                error=error,
                source=source,
            )
            self.history.append(record)
            self.metrics.reloads.labels(outcome).inc()
            if outcome == "loaded":
                self.version, self.path = version, path
                self.metrics.policy_version.set(version)
                log.info("policy v%d loaded from %s in %.2fs", version, path, record.duration_s)
            else:
                self._refused.add((version, path))
                log.warning("policy v%d at %s %s: %s; still serving v%d", version, path, outcome, error, self.version)
            return record

    def stop(self) -> None:
        """Ask `run` to return (within one poll interval)."""
        self._stopping.set()

    async def run(self) -> None:
        """Follow events and poll until `stop()`; Redis outages are logged and retried."""
        while not self._stopping.is_set():
            try:
                await self._follow()
            except (RedisError, OSError) as exc:
                log.warning("policy watcher lost Redis (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.poll_s)

    async def _follow(self) -> None:
        # Stopping is cooperative: cancelling a task inside redis-py's pub/sub read can leave it hanging.
        pubsub = self.r.pubsub()
        await pubsub.subscribe(self.keys.policy_events)
        try:
            await self.check("poll")  # whatever was published while we were not subscribed
            last_poll = time.monotonic()
            while not self._stopping.is_set():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=STOP_CHECK_S)
                if message is not None:
                    await self.check("event")
                elif time.monotonic() - last_poll >= self.poll_s:
                    last_poll = time.monotonic()
                    await self.check("poll")
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
