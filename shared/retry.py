"""Surviving Redis outages: one way to open a Redis client, and one backoff loop for the components.

Two layers. The client (`async_redis` / `sync_redis`) has socket timeouts, so a frozen server cannot hang a
call forever, a health check on idle connections, and redis-py's own short retry with jittered exponential
backoff for connection errors and timeouts (a restart that takes a second is invisible to callers). An
outage longer than that surfaces as an error; the components' loops then call `retry_async` /
`retry_sync`, which keep retrying with exponential backoff and full jitter up to a bounded total time,
logging each failure once per attempt. Neither layer logs a URL or a password: messages go through
`shared.config.redact_url_credentials`.

Where an answer is owed within a bound whatever Redis does (readiness probes, job status), `deadline` caps the
calls inside it: past the bound they are cancelled (redis-py drops the connection they were on) and a redis
`TimeoutError` is raised, which the service answers with 503.

Every retried operation must be idempotent (a timed-out command may still have run on the server):
mindgap's Redis writes are (Lua commits guarded by sets, HSETNX before XADD, XACK, HSET).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError
from redis.retry import Retry

from shared.config import redact_url_credentials

log = logging.getLogger("mindgap.retry")

T = TypeVar("T")

# What a retry can fix: the server is unreachable, frozen, restarting or still loading its AOF. Other
# errors (a wrong command, NOSCRIPT, NOGROUP…) are answers and go to the caller at once. OSError covers
# socket errors raised outside redis-py's wrapping.
TRANSIENT: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, BusyLoadingError, OSError)

# redis-py's own retries of one command before the error reaches the component: with EqualJitterBackoff
# (0.1 s doubling, capped at 1 s) they span 1.2-2.4 s of back-off, enough to hide a Redis restart.
CLIENT_RETRIES = 4


def client_options(timeout_s: float = 5.0) -> dict[str, Any]:
    """Keyword arguments for a redis-py client besides `retry`: timeouts, keepalive, idle health checks."""
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "socket_keepalive": True,
        "health_check_interval": 15,
        "retry_on_error": [BusyLoadingError],
    }


def _client_backoff() -> EqualJitterBackoff:
    return EqualJitterBackoff(cap=1.0, base=0.1)


def async_redis(url: str, timeout_s: float = 5.0, retries: int = CLIENT_RETRIES) -> aioredis.Redis:
    """An asyncio client for `url` with `client_options`; blocking reads must block for less than `timeout_s`."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        url, retry=AsyncRetry(_client_backoff(), retries), **client_options(timeout_s)
    )
    return client


def sync_redis(url: str, timeout_s: float = 5.0, retries: int = CLIENT_RETRIES) -> redis.Redis:
    """A blocking client for `url` with `client_options`."""
    client: redis.Redis = redis.Redis.from_url(
        url, retry=Retry(_client_backoff(), retries), **client_options(timeout_s)
    )
    return client


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n sleeps uniform(0, min(cap, base·2ⁿ)), for at most `total_s`."""

    base: float = 0.2
    cap: float = 5.0
    total_s: float = 300.0

    def delay(self, attempt: int) -> float:
        """Seconds to sleep before retry number `attempt` (0-based)."""
        return random.uniform(0.0, min(self.cap, self.base * 2.0**attempt))


DEFAULT_BACKOFF = Backoff()


def _give_up(what: str, attempt: int, started: float, exc: BaseException, policy: Backoff) -> float | None:
    """The delay before the next attempt, or None when the total time is spent (the caller re-raises)."""
    elapsed = time.monotonic() - started
    if elapsed >= policy.total_s:
        log.error("%s: Redis still unavailable after %.0fs, giving up: %s", what, elapsed, _reason(exc))
        return None
    delay = min(policy.delay(attempt), max(0.0, policy.total_s - elapsed))
    log.warning("%s: Redis unavailable (%s); retry %d in %.2fs", what, _reason(exc), attempt + 1, delay)
    return delay


def _reason(exc: BaseException) -> str:
    return redact_url_credentials(f"{type(exc).__name__}: {exc}")


async def retry_async(op: Callable[[], Awaitable[T]], what: str, policy: Backoff = DEFAULT_BACKOFF) -> T:
    """Await `op()` until it does not raise a transient Redis error; re-raise after `policy.total_s`."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return await op()
        except TRANSIENT as exc:
            delay = _give_up(what, attempt, started, exc, policy)
            if delay is None:
                raise
        await asyncio.sleep(delay)
        attempt += 1


def retry_sync(op: Callable[[], T], what: str, policy: Backoff = DEFAULT_BACKOFF) -> T:
    """`retry_async` for blocking code."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return op()
        except TRANSIENT as exc:
            delay = _give_up(what, attempt, started, exc, policy)
            if delay is None:
                raise
        time.sleep(delay)
        attempt += 1


@contextlib.asynccontextmanager
async def deadline(seconds: float, what: str) -> AsyncIterator[None]:
    """Bound the Redis calls inside the block to `seconds` in all; past it raise redis' TimeoutError naming `what`.

    The socket timeout and redis-py's retries can keep one call busy for many seconds against a frozen server;
    this is for callers that must answer sooner (with an error) instead.
    """
    try:
        async with asyncio.timeout(seconds):
            yield
    except builtins.TimeoutError:  # asyncio's; `TimeoutError` here is redis-py's
        raise TimeoutError(f"{what}: Redis did not answer within {seconds:g}s") from None
