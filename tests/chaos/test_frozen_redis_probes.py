"""Probes and status reads against a frozen Redis (SIGSTOP): they answer 503 within 2 s, then 200 once it thaws.

The service runs with the default Redis socket timeout (5 s), whose retries alone would keep a call busy for
half a minute: the bound comes from `probe_timeout_s`, not from the socket.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from mindgap.redis_server import RedisServer
from tests.support.chaos_jobs import submit, wait_done
from tests.support.service import ServeProcess

pytestmark = [pytest.mark.chaos, pytest.mark.redis, pytest.mark.slow]

ANSWER_WITHIN_S = 2.0


def timed_get(http: httpx.Client, path: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    resp = http.get(path)
    return resp, time.monotonic() - started


def test_readyz_and_job_status_answer_503_within_2s_while_redis_is_frozen(
    chaos_serve: Callable[..., ServeProcess], chaos_redis: RedisServer
) -> None:
    serve = chaos_serve(MINDGAP_REDIS_TIMEOUT_S="5")
    serve.start()
    with httpx.Client(base_url=serve.url, timeout=60) as http:
        job = submit(http, n=4)
        wait_done(http, job)
        chaos_redis.freeze()
        try:
            for path in ("/readyz", f"/v1/jobs/{job}", "/v1/jobs"):
                resp, took = timed_get(http, path)
                assert resp.status_code == 503, (path, resp.text)
                assert took < ANSWER_WITHIN_S, f"{path} took {took:.1f}s against a frozen Redis"
            assert "redis" in resp.text.lower()
            # what does not need Redis answers as usual
            assert http.get("/healthz").status_code == 200
            assert http.get("/v1/policy").status_code == 200
        finally:
            chaos_redis.thaw()
        deadline = time.monotonic() + 30
        while (ready := http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.2)
        assert http.get(f"/v1/jobs/{job}").json()["state"] == "completed"
