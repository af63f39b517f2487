"""The weights watcher: follows the trainer's policy version and reloads the engine between batches.

The trainer writes `checkpoints/v{N}/`, then a `READY` marker, then sets the `policy` hash (version, path)
and publishes on `policy:events`. The watcher listens on that channel and also polls the hash (events are
fire-and-forget, so a missed one is caught by the next poll). On a newer version it closes the engine gate
(no new chunks start), waits for running batches to finish, reloads, and reopens: every example made
afterwards carries the new version. A folder without READY, or weights that fail to load, are refused;
the old weights keep serving and that (version, path) is not tried again.

Versions only go forward: the hash is followed when it names a version above every version served so far,
and an admin reload to an older (or the same) version needs `allow_rollback`. A rollback holds until the
trainer publishes a version above the one rolled back from. A hash that cannot be read as a policy (a
version that is not an integer in 0 … 2**63 - 1, a missing path, a key of the wrong type) is logged once,
reported by `status()` and /readyz, and otherwise ignored: the watcher keeps serving the weights it has and
keeps following the hash, so a later valid version is taken as usual.
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
from redis.exceptions import RedisError, ResponseError

from services.engine import Engine
from services.metrics import Metrics
from services.scheduler import EngineGate
from shared.keys import Keys
from shared.wire import POLICY_VERSION_MAX, PolicyStatus, ReloadRecord

log = logging.getLogger("mindgap.policy")

READY_MARKER = "READY"
STOP_CHECK_S = 1.0  # longest wait for an event before looking at the stop flag (and maybe polling)
Source = Literal["startup", "event", "poll", "admin"]


def version_from_path(path: str) -> int | None:
    """The N of a checkpoint folder named `v{N}`, or None."""
    match = re.fullmatch(r"v(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


class PolicyHashError(ValueError):
    """The `policy` hash in Redis does not describe a policy (it is reported, never acted on)."""


class StaleVersion(ValueError):
    """An admin reload to a version not above the served one, without `allow_rollback`."""


def parse_policy(version: bytes | str | None, path: bytes | str | None) -> tuple[int, str] | None:
    """The (version, path) of the `policy` hash's fields; None when neither is set (nothing published yet).

    Raises PolicyHashError naming what is wrong: a version that is not an integer in 0 … POLICY_VERSION_MAX,
    or one field without the other.
    """
    if version is None and path is None:
        return None
    text = version.decode(errors="replace") if isinstance(version, bytes) else version
    where = path.decode(errors="replace") if isinstance(path, bytes) else path
    if text is None:
        raise PolicyHashError(f"it has a path ({where!r}) but no version")
    if not text.isascii() or not text.isdigit() or int(text) > POLICY_VERSION_MAX:
        raise PolicyHashError(f"version {text[:40]!r} is not an integer in 0 … {POLICY_VERSION_MAX}")
    if not where:
        raise PolicyHashError(f"version {text} has no checkpoint path")
    return int(text), where


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
        # the highest version served so far: the hash is followed only above it (a rollback does not lower it)
        self.newest = 0
        self.hash_error: str | None = None  # why the `policy` hash was last unusable; None while it is fine
        self.history: deque[ReloadRecord] = deque(maxlen=history)
        self._refused: set[tuple[int, str]] = set()
        self._lock = asyncio.Lock()
        self._reloading = False
        self._stopping = asyncio.Event()

    def status(self) -> PolicyStatus:
        """The served version and the reload history."""
        return PolicyStatus(
            version=self.version,
            path=self.path,
            reloading=self._reloading,
            history=list(self.history),
            error=self.hash_error,
        )

    async def check(self, source: Source) -> ReloadRecord | None:
        """Reload if the `policy` hash names a version above every one served; an unusable hash is reported."""
        try:
            raw = await self.r.hmget(self.keys.policy, ["version", "path"])
            published = parse_policy(raw[0], raw[1])
        except ResponseError as exc:  # WRONGTYPE: the key holds a string, a list…
            self._hash_unusable(str(exc))
            return None
        except PolicyHashError as exc:
            self._hash_unusable(str(exc))
            return None
        if self.hash_error is not None:
            log.info("the policy hash %s is usable again", self.keys.policy)
            self.hash_error = None
            self.metrics.policy_hash_error.set(0)
        if published is None:
            return None
        version, path = published
        if version <= self.newest or (version, path) in self._refused:
            return None
        return await self.reload(path, version, source)

    def _hash_unusable(self, reason: str) -> None:
        message = f"the policy hash {self.keys.policy} is unusable: {reason}; still serving v{self.version}"
        if message != self.hash_error:  # once per distinct problem, not once per poll
            log.error("%s", message)
        self.hash_error = message
        self.metrics.policy_hash_error.set(1)

    async def reload(
        self, path: str, version: int | None, source: Source, allow_rollback: bool = False
    ) -> ReloadRecord:
        """Load the checkpoint at `path` as `version` between batches; refuse it without READY or on failure.

        `version` None: the N of a `v{N}` folder, else the served version + 1. A version not above the served
        one raises StaleVersion unless `allow_rollback` (the admin's explicit choice).
        """
        async with self._lock:
            if version is None:
                version = version_from_path(path)
                if version is None:
                    version = self.version + 1
            if version <= self.version and not allow_rollback:
                raise StaleVersion(
                    f"version {version} is not above the served v{self.version}: set allow_rollback to go back"
                )
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
                if version < self.version:
                    log.warning("policy rolled back from v%d to v%d (%s)", self.version, version, source)
                self.version, self.path = version, path
                self.newest = max(self.newest, version)
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
            except Exception:
                # Nothing may end the watcher while the service runs: a dead watcher means weights that silently
                # stop following the trainer. Whatever went wrong is logged in full, then the watcher starts over.
                log.exception("policy watcher failed; restarting it")
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
