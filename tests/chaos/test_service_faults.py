"""The rewrite service under faults: SIGKILL mid-job, a Redis restart, a Redis frozen past the client timeouts.

Each test runs a job on `mindgap serve --backend fake` processes, hits it with the fault while chunks are
in flight, and then checks the same end state: the job completes, every problem is counted once, and the
job's results and the examples stream hold the same examples, none twice (`tests.support.chaos_jobs.check_job`).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import httpx
import pytest
import redis

from mindgap.redis_server import RedisServer
from shared.keys import Keys
from tests.support.chaos_jobs import check_job, freeze, submit, wait_chunks
from tests.support.service import ServeProcess

pytestmark = [pytest.mark.chaos, pytest.mark.redis, pytest.mark.slow]


def test_service_sigkilled_mid_job_is_taken_over_by_a_restarted_replica(
    chaos_serve: Callable[..., ServeProcess], chaos_redis: RedisServer, key_prefix: str
) -> None:
    first = chaos_serve()
    first.start()
    with httpx.Client(base_url=first.url, timeout=10) as http:
        job = submit(http)
        wait_chunks(http, job, 3)
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL  # no drain: its chunks stay pending
    second = chaos_serve()
    second.start()
    r = redis.Redis.from_url(chaos_redis.url)
    with httpx.Client(base_url=second.url, timeout=10) as http:
        check_job(http, r, Keys(key_prefix), job)
    assert "reclaimed" in second.log_path.read_text()  # the dead replica's chunks were taken over


def test_redis_restart_mid_job_loses_nothing(
    chaos_serve: Callable[..., ServeProcess], chaos_redis: RedisServer, key_prefix: str
) -> None:
    serve = chaos_serve()
    serve.start()
    r = redis.Redis.from_url(chaos_redis.url)
    with httpx.Client(base_url=serve.url, timeout=10) as http:
        job = submit(http)
        done = wait_chunks(http, job, 2)["chunks_done"]
        chaos_redis.restart()  # SIGTERM: the AOF (fsync always) holds every acknowledged write
        done = wait_chunks(http, job, done + 1)["chunks_done"]  # work goes on after the restart
        chaos_redis.restart()
        check_job(http, r, Keys(key_prefix), job)
        assert http.get("/readyz").status_code == 200


FREEZE_S = 8.0  # the service's 1 s socket timeout plus redis-py's own retries give up after about 7 s


def test_redis_frozen_past_client_timeouts_answers_then_recovers(
    chaos_serve: Callable[..., ServeProcess], chaos_redis: RedisServer, key_prefix: str
) -> None:
    serve = chaos_serve()
    serve.start()
    r = redis.Redis.from_url(chaos_redis.url)
    with httpx.Client(base_url=serve.url, timeout=30) as http:
        # 1. frozen while the worker idles (it polls the task streams): it must outlive the outage
        frozen = threading.Thread(target=freeze, args=(chaos_redis, FREEZE_S))
        frozen.start()
        time.sleep(0.5)
        started = time.monotonic()
        during = http.get("/readyz")
        answered_in = time.monotonic() - started
        frozen.join()
        # a frozen Redis never hangs a request or turns it into a 500: it answers once the client's
        # retries hide the outage (200) or give up (503, "retry later")
        assert during.status_code in (200, 503), during.text
        assert answered_in < FREEZE_S + 2, f"readyz took {answered_in:.1f}s while Redis was frozen"
        # 2. frozen mid-job, with chunks on the engine and commits waiting for Redis
        job = submit(http)
        wait_chunks(http, job, 2)
        freeze(chaos_redis, FREEZE_S)
        check_job(http, r, Keys(key_prefix), job)
    log = serve.log_path.read_text()
    assert "task stream unavailable" in log  # the outage reached the worker loop, which waited it out
    assert "Redis unavailable" in log  # and a running chunk, which kept its result until Redis was back
