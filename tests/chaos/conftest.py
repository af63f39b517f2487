"""Fixtures of the chaos suite: a Redis the suite may kill and freeze, and `mindgap serve` processes on it.

The suite owns its Redis (not the session one other tests use), so restarts and SIGSTOP here cannot
disturb them. Every wait is bounded; every process is killed at teardown.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mindgap.redis_server import RedisServer
from tests.support.redis import start_redis
from tests.support.service import ServeProcess

# Short client timeouts and reclaim times keep each fault (and the recovery from it) a few seconds long.
SERVE_ENV = {
    "MINDGAP_REDIS_TIMEOUT_S": "1",
    "MINDGAP_CLAIM_IDLE_MS": "1500",
    "MINDGAP_CHUNK_SIZE": "2",
    "MINDGAP_MAX_INFLIGHT_CHUNKS": "2",
    "MINDGAP_FAKE_DELAY_S": "0.15",
    "MINDGAP_POLICY_POLL_S": "0.5",
}


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server (AOF, fsync always) this test alone uses: restart it, SIGSTOP it."""
    server = start_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()  # thaws a frozen server first: it would not act on SIGTERM


@pytest.fixture
def chaos_serve(chaos_redis: RedisServer, key_prefix: str, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """A factory of `mindgap serve --backend fake` processes on `chaos_redis` (each a new replica)."""
    started: list[ServeProcess] = []

    def make(*args: str, **env: str) -> ServeProcess:
        full = {k: v for k, v in os.environ.items() if not k.startswith("MINDGAP_")}
        full |= {"MINDGAP_REDIS_URL": chaos_redis.url, "MINDGAP_KEY_PREFIX": key_prefix, "PYTHONUNBUFFERED": "1"}
        full |= SERVE_ENV | env
        proc = ServeProcess(full, list(args), tmp_path / f"serve-{len(started)}.log")
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()
