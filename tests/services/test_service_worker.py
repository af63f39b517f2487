"""Worker and job store against a real redis-server: restarts, exactly-once commits, dead letters, online
epochs, fair share between jobs and backpressure."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

import services.job_store
from services.engine import Engine
from services.fake_engine import FakeEngine, arithmetic_script
from services.job_store import Commit, JobStore
from services.settings import ServiceConfig
from shared.config import StageParams
from shared.keys import TRAINER_GROUP, Keys
from shared.schema import Example, Problem
from shared.streams import field
from shared.wire import JobSpec, RowError
from tests.support.service import FAST_PARAMS, arithmetic_rows, running_service, wait_for_job

pytestmark = pytest.mark.redis

ConfigFactory = Callable[..., ServiceConfig]


async def stream_ids(redis_url: str, key_prefix: str) -> list[str]:
    r = aioredis.from_url(redis_url)
    entries = await r.xrange(Keys(key_prefix).examples)
    await r.aclose()
    return [field(e, "id") or "" for _, e in entries]


async def results(client, job_id: str) -> list[Example]:
    text = (await client.get(f"/v1/jobs/{job_id}/results")).text
    return [Example.model_validate_json(line) for line in text.splitlines()]


async def test_a_new_app_on_the_same_redis_finishes_a_job(
    service_config: ConfigFactory, redis_url: str, key_prefix: str
) -> None:
    cfg = service_config(fake_delay_s=0.05, max_inflight_chunks=1)
    body = {"rows": arithmetic_rows(10), "params": FAST_PARAMS}
    async with running_service(cfg) as (client, _):
        job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
        while (await client.get(f"/v1/jobs/{job_id}")).json()["problems_done"] < 2:
            await asyncio.sleep(0.05)
    # the first app stopped after draining its running chunk; the rest waits in the task stream
    async with running_service(service_config()) as (client, _):
        status = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert status["state"] == "running" and 2 <= status["problems_done"] < 10
        status = await wait_for_job(client, job_id)
        examples = await results(client, job_id)
    assert status["problems_done"] == 10 and status["chunks_done"] == 5
    assert Counter(e.problem_id for e in examples) == Counter(str(i) for i in range(1, 11))
    assert sorted(await stream_ids(redis_url, key_prefix)) == sorted(e.id for e in examples)


async def test_a_redelivered_chunk_commits_once(redis_url: str, key_prefix: str) -> None:
    r = aioredis.from_url(redis_url)
    keys = Keys(key_prefix)
    store = JobStore(r, keys, ttl_s=60)
    problems = [Problem(id=str(i), question=f"What is {i}+1?", answer=str(i + 1)) for i in range(3)]
    created = await store.create(problems, [RowError(line=4, message="bad")], JobSpec(), StageParams(), chunk_size=2)
    assert created.chunks == 2
    first = await store.commit_chunk(created.id, "0:0", {"problems_done": 2, "p:self": 2}, [("a", "{}")], 0)
    again = await store.commit_chunk(created.id, "0:0", {"problems_done": 2, "p:guided": 2}, [("b", "{}")], 1)
    assert (first, again) == (Commit.COMMITTED, Commit.DUPLICATE)
    status = await store.status(created.id)
    assert status is not None
    assert status.problems_done == 2 and status.stages["self"] == 2 and status.stages["guided"] == 0
    assert status.policy_versions == [0] and status.state == "running"
    assert await r.xlen(keys.examples) == 1
    last = await store.commit_chunk(created.id, "0:1", {"problems_done": 1}, [("c", "{}")], 0)
    assert last is Commit.JOB_FINISHED
    status = await store.status(created.id)
    assert status is not None and status.state == "completed" and status.progress == 1.0
    assert 0 < await r.ttl(keys.job(created.id)) <= 60
    assert await store.commit_chunk(created.id, "0:1", {}, [], 0) is Commit.JOB_GONE
    assert await store.cancel(created.id) == "completed"
    await r.aclose()


def failing_engine(bad_question: str) -> Callable[[ServiceConfig], object]:
    def script(prompt: str, index: int) -> str:
        if bad_question in prompt:
            raise ValueError("boom on purpose")
        return arithmetic_script(prompt, index)

    async def factory(cfg: ServiceConfig) -> Engine:
        return FakeEngine(script)

    return factory


async def test_a_chunk_that_keeps_failing_is_dead_lettered_with_the_reason(
    service_config: ConfigFactory, redis_url: str, key_prefix: str
) -> None:
    rows = arithmetic_rows(4)  # chunks of 2: the second chunk holds the bad question
    cfg = service_config(claim_idle_ms=200, max_deliveries=2)
    async with running_service(cfg, failing_engine(rows[2]["question"])) as (client, _):
        job_id = (await client.post("/v1/jobs", json={"rows": rows, "params": FAST_PARAMS})).json()["id"]
        status = await wait_for_job(client, job_id, ("failed",), timeout=30)
        examples = await results(client, job_id)
        metrics = (await client.get("/metrics")).text
    assert status["chunks_failed"] == 1 and status["problems_done"] == 2
    assert "boom on purpose" in status["error"] and "delivered 3 times" in status["error"]
    assert sorted(e.problem_id for e in examples) == ["1", "2"]  # the good chunk's results are kept
    assert 'mindgap_chunks_total{outcome="dead_lettered"} 1.0' in metrics
    r = aioredis.from_url(redis_url)
    dead = await r.xrange(Keys(key_prefix).deadletter)
    await r.aclose()
    assert len(dead) == 1
    assert "ValueError: boom on purpose" in (field(dead[0][1], "reason") or "")
    assert job_id in (field(dead[0][1], "data") or "")


async def test_online_job_cycles_epochs_with_epoch_in_example_ids(
    service_config: ConfigFactory, redis_url: str, key_prefix: str
) -> None:
    async with running_service(service_config()) as (client, _):
        body = {"rows": arithmetic_rows(3), "params": FAST_PARAMS, "mode": "online", "epochs": 3}
        job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
        status = await wait_for_job(client, job_id)
        examples = await results(client, job_id)
    assert status["epoch"] == 2 and status["problems_done"] == 9 and status["progress"] == 1.0
    assert Counter(e.problem_id for e in examples) == {"1": 3, "2": 3, "3": 3}
    assert len({e.id for e in examples}) == 9
    assert sorted(await stream_ids(redis_url, key_prefix)) == sorted(e.id for e in examples)


async def test_open_ended_online_job_runs_until_cancelled(service_config: ConfigFactory) -> None:
    async with running_service(service_config()) as (client, _):
        body = {"rows": arithmetic_rows(2), "params": FAST_PARAMS, "mode": "online"}
        job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
        while (status := (await client.get(f"/v1/jobs/{job_id}")).json())["epoch"] < 3:
            assert status["state"] in ("queued", "running") and status["progress"] is None
            await asyncio.sleep(0.05)
        assert (await client.post(f"/v1/jobs/{job_id}/cancel")).json()["state"] == "cancelled"


async def test_a_small_job_is_not_stuck_behind_a_big_one(
    service_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the big job gets the smaller id, so serving jobs in id order (no rotation) would starve the small one
    ids = iter([uuid.UUID(int=1), uuid.UUID(int=2**128 - 1)])
    monkeypatch.setattr(services.job_store, "uuid", SimpleNamespace(uuid4=lambda: next(ids)))
    cfg = service_config(fake_delay_s=0.02, max_inflight_chunks=1, chunk_size=1)
    async with running_service(cfg) as (client, _):
        big = (await client.post("/v1/jobs", json={"rows": arithmetic_rows(30), "params": FAST_PARAMS})).json()["id"]
        small = (await client.post("/v1/jobs", json={"rows": arithmetic_rows(3), "params": FAST_PARAMS})).json()["id"]
        await wait_for_job(client, small)
        assert big < small
        big_status = (await client.get(f"/v1/jobs/{big}")).json()
        # round-robin: while the small job ran 3 chunks, the big one got about as many slots, not all of them
        assert big_status["problems_done"] <= 10, big_status
        await client.post(f"/v1/jobs/{big}/cancel")


async def test_backpressure_holds_chunks_while_the_trainer_lags(
    service_config: ConfigFactory, redis_url: str, key_prefix: str
) -> None:
    async with running_service(service_config(max_lag=2, chunk_size=1, max_inflight_chunks=1)) as (client, _):
        job_id = (await client.post("/v1/jobs", json={"rows": arithmetic_rows(6), "params": FAST_PARAMS})).json()["id"]
        # three chunks run (the third starts at lag 2), then the job stalls and its status says why
        deadline = time.monotonic() + 30
        while (status := (await client.get(f"/v1/jobs/{job_id}")).json())["waiting"] is None:
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)
        assert status["waiting"] == "trainer lag 3 > max_lag 2", status
        await asyncio.sleep(1.0)
        status = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert status["state"] == "running" and status["problems_done"] == 3, status
        # … on /readyz too (still ready: the replica is fine, the trainer is slow), and in the metrics
        assert (await client.get("/v1/jobs")).json()["jobs"][0]["waiting"] == status["waiting"]
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["waiting"] == status["waiting"], ready.text
        metrics = (await client.get("/metrics")).text
        assert "mindgap_stream_lag 3.0" in metrics and "mindgap_backpressure 1.0" in metrics

        r = aioredis.from_url(redis_url)

        async def trainer() -> None:  # a consumer that keeps reading
            while True:
                await r.xreadgroup(TRAINER_GROUP, "t", {Keys(key_prefix).examples: ">"}, count=10, block=100)

        reader = asyncio.create_task(trainer())
        try:
            done = await wait_for_job(client, job_id, timeout=30)
            assert done["waiting"] is None, done
            assert "mindgap_backpressure 0.0" in (await client.get("/metrics")).text
        finally:
            reader.cancel()
            await r.aclose()
