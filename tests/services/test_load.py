"""Load: many concurrent clients submit, poll and download against one `mindgap serve --backend fake` on
loopback; status latency stays bounded, every job completes with its results, and finished jobs are removed
from Redis after `job_ttl_s`, so Redis does not grow with the number of jobs served."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from shared.keys import Keys
from tests.support.service import FAST_PARAMS, ServeProcess, arithmetic_rows

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CLIENTS = 20
JOBS_PER_CLIENT = 3
ROWS_PER_JOB = 4
JOB_TTL_S = 10  # longer than a finished job waits for its client to come back and download it
# Generous bounds: a status call is a few Redis reads (milliseconds on an idle machine), but the suite
# shares 2 cores with everything else; measured there under a load average of 20: p50 0.34 s, p99 2.2 s.
P50_BOUND_S = 1.0
P99_BOUND_S = 5.0


async def _follow(http: httpx.AsyncClient, job_id: str, latencies: list[float]) -> dict[str, Any]:
    """Poll one job to the end (timing every status call), then download its results."""
    deadline = time.monotonic() + 180
    while True:
        t0 = time.perf_counter()
        resp = await http.get(f"/v1/jobs/{job_id}")
        latencies.append(time.perf_counter() - t0)
        assert resp.status_code == 200, resp.text
        status: dict[str, Any] = resp.json()
        if status["state"] not in ("queued", "running"):
            break
        assert time.monotonic() < deadline, f"job {job_id} still {status['state']}"
        await asyncio.sleep(0.1)
    results = await http.get(f"/v1/jobs/{job_id}/results")
    assert results.status_code == 200, results.text
    status["results"] = [json.loads(line) for line in results.text.splitlines()]
    return status


async def _client(http: httpx.AsyncClient, index: int, latencies: list[float]) -> list[dict[str, Any]]:
    """One client: submit its jobs, then follow each to the end and download its results."""
    ids = []
    for j in range(JOBS_PER_CLIENT):
        start = (index * JOBS_PER_CLIENT + j) * ROWS_PER_JOB
        resp = await http.post("/v1/jobs", json={"rows": arithmetic_rows(ROWS_PER_JOB, start), "params": FAST_PARAMS})
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["id"])
    return [await _follow(http, job_id, latencies) for job_id in ids]  # one request in flight per client


def _job_keys(r: redis.Redis, keys: Keys) -> set[str]:
    """Every key of any job (hashes, problems, results, done sets, task streams…) under the prefix."""
    found = {k.decode() for k in r.scan_iter(match=f"{keys.prefix}:job:*", count=1000)}
    return found | {k.decode() for k in r.scan_iter(match=f"{keys.job_tasks('*')}", count=1000)}


def test_concurrent_clients_bounded_latency_and_finished_jobs_expire(
    serve_process: Callable[..., ServeProcess], redis_url: str, key_prefix: str
) -> None:
    serve = serve_process(
        MINDGAP_JOB_TTL_S=str(JOB_TTL_S),
        MINDGAP_CHUNK_SIZE="4",
        MINDGAP_MAX_INFLIGHT_CHUNKS="8",
        MINDGAP_FAKE_DELAY_S="0.01",
    )
    serve.start()
    latencies: list[float] = []

    async def run() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=serve.url, timeout=60, limits=limits) as http:
            per_client = await asyncio.gather(*(_client(http, i, latencies) for i in range(CLIENTS)))
        return [job for jobs in per_client for job in jobs]

    jobs = asyncio.run(run())
    assert len(jobs) == CLIENTS * JOBS_PER_CLIENT
    for job in jobs:
        assert job["state"] == "completed" and job["problems_done"] == ROWS_PER_JOB, job
        ids = [ex["id"] for ex in job["results"]]
        assert len(ids) == len(set(ids)) == job["examples_total"] > 0
    cuts = statistics.quantiles(latencies, n=100)
    p50, p99 = statistics.median(latencies), cuts[98]
    print(f"status latency over {len(latencies)} calls: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    assert p50 < P50_BOUND_S and p99 < P99_BOUND_S, (p50, p99)

    # Retention: finished jobs stay readable for job_ttl_s, then every key of theirs is gone.
    keys = Keys(key_prefix)
    r = redis.Redis.from_url(redis_url)
    assert _job_keys(r, keys), "finished jobs should still be retained right after finishing"
    deadline = time.monotonic() + JOB_TTL_S + 10
    while _job_keys(r, keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _job_keys(r, keys), sorted(_job_keys(r, keys))[:10]
    with httpx.Client(base_url=serve.url, timeout=30) as http:
        assert http.get(f"/v1/jobs/{jobs[0]['id']}").status_code == 404
        assert r.scard(keys.active_jobs) == 0
        # The job indexes forget expired jobs too: once a new job arrives only it is listed.
        resp = http.post("/v1/jobs", json={"rows": arithmetic_rows(1), "params": FAST_PARAMS})
        assert resp.status_code == 201
        assert [m.decode() for m in r.zrange(keys.jobs, 0, -1)] == [resp.json()["id"]]
        assert r.zcard(keys.jobs_expiring) == 0
        assert [j["id"] for j in http.get("/v1/jobs").json()["jobs"]] == [resp.json()["id"]]
