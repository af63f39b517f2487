"""Chaos-suite helpers: jobs to submit, bounded waits, a Redis freeze, and the end state every test checks."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
import redis

from mindgap.redis_server import RedisServer
from shared.keys import Keys
from shared.streams import field

ROWS = 24  # 12 chunks of 2 at ~0.3 s each (fake delay per engine call): long enough to hit mid-job
FAST_PARAMS = {"k": 2, "resolve_attempts": 2, "max_tokens": 200, "keep": 1}


def rows(n: int = ROWS, start: int = 0) -> list[dict[str, Any]]:
    """Problems the fake engine answers, a mix of self, guided and expert outcomes."""
    return [{"question": f"What is {i}+{i + 2}?", "answer": str(2 * i + 2)} for i in range(start, start + n)]


def submit(http: httpx.Client, n: int = ROWS, start: int = 0) -> str:
    """Create a job of `n` inline rows; its id."""
    resp = http.post("/v1/jobs", json={"rows": rows(n, start), "params": FAST_PARAMS})
    assert resp.status_code == 201, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def wait_chunks(http: httpx.Client, job_id: str, chunks: int, timeout: float = 60.0) -> dict[str, Any]:
    """Poll until at least `chunks` chunks of the job are committed (503s while Redis recovers are retried)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = http.get(f"/v1/jobs/{job_id}")
        assert resp.status_code in (200, 503), resp.text
        s: dict[str, Any] = resp.json()
        if resp.status_code == 200 and s["chunks_done"] >= chunks:
            assert s["state"] == "running", f"job finished before the fault could hit it: {s}"
            return s
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {chunks} chunks in {timeout}s")


def wait_done(http: httpx.Client, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
    """Poll (tolerating refused connections and 503s while something recovers) until the job finishes."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            resp = http.get(f"/v1/jobs/{job_id}")
        except httpx.TransportError as exc:
            last = exc
        else:
            last = resp.text
            if resp.status_code == 200 and resp.json()["state"] not in ("queued", "running"):
                body: dict[str, Any] = resp.json()
                return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not finished after {timeout}s; last answer: {last}")


def check_job(http: httpx.Client, r: redis.Redis, keys: Keys, job_id: str, n: int = ROWS) -> list[dict[str, Any]]:
    """Completed, every problem accounted for once, results = the stream's entries for the job, no duplicates."""
    s = wait_done(http, job_id)
    assert s["state"] == "completed", s
    assert s["problems"] == s["problems_done"] == n, s
    assert s["chunks_done"] == s["chunks"] and s["chunks_failed"] == 0, s
    assert sum(s["stages"].values()) + s["dropped"] == n, s
    resp = http.get(f"/v1/jobs/{job_id}/results")
    assert resp.status_code == 200, resp.text
    results = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
    ids = [ex["id"] for ex in results]
    assert len(ids) == len(set(ids)), "duplicated examples in the job's results"
    # keep=1: each problem that got a stage has exactly one example, and none has more
    per_problem = Counter(ex["problem_id"] for ex in results)
    assert set(per_problem.values()) <= {1}, per_problem
    assert len(results) == sum(s["stages"].values()) == s["examples_total"], (len(results), s)
    assert Counter(ex["stage"] for ex in results) == {k: v for k, v in s["examples"].items() if v}
    stream_ids = [field(data or {}, "id") for _, data in r.xrange(keys.examples) or []]
    assert len(stream_ids) == len(set(stream_ids)), "an example entered the stream twice"
    assert set(stream_ids) == set(ids), "the stream and the job's results disagree"
    assert r.xlen(keys.deadletter) == 0, r.xrange(keys.deadletter)
    return results


def freeze(server: RedisServer, seconds: float) -> None:
    """SIGSTOP the server for `seconds`, then SIGCONT it (always, even if interrupted)."""
    assert server.running
    server.freeze()
    try:
        time.sleep(seconds)
    finally:
        server.thaw()
