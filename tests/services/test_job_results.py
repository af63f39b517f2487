"""A job's results as references into the examples stream: one copy of each record, downloadable in input
order after the trainer has acked, kept until the job expires, and never trimmed while unacknowledged."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from services.job_store import JobStore
from shared.config import StageParams
from shared.keys import TRAINER_GROUP, Keys
from shared.schema import Problem
from shared.streams import field
from shared.wire import JobSpec

pytestmark = pytest.mark.redis


async def new_job(store: JobStore, problems: int, chunk_size: int = 2) -> str:
    rows = [Problem(id=str(i), question=f"What is {i}+1?", answer=str(i + 1)) for i in range(problems)]
    return (await store.create(rows, [], JobSpec(), StageParams(), chunk_size=chunk_size)).id


async def commit(store: JobStore, job_id: str, chunk: int, rows: list[int]) -> None:
    examples = [(f"{job_id}-{i}", json.dumps({"job": job_id, "row": i})) for i in rows]
    await store.commit_chunk(job_id, f"0:{chunk}", {"problems_done": len(rows)}, examples, 0)
    await asyncio.sleep(0.005)  # the next commit lands in a later millisecond of the stream's ids


async def rows_of(store: JobStore, job_id: str) -> list[int]:
    return [json.loads(line)["row"] async for line in store.results(job_id)]


async def stream_jobs(r: aioredis.Redis, keys: Keys) -> list[str]:
    return [json.loads(field(e, "data") or "{}")["job"] for _, e in await r.xrange(keys.examples)]


async def read_and_ack(r: aioredis.Redis, keys: Keys, ack: bool = True) -> int:
    reply = await r.xreadgroup(TRAINER_GROUP, "trainer-0", {keys.examples: ">"}, count=1000)
    ids = [entry_id for _, entries in reply or [] for entry_id, _ in entries]
    if ack and ids:
        await r.xack(keys.examples, TRAINER_GROUP, *ids)
    return len(ids)


async def test_results_are_stored_once_and_read_in_input_order(redis_url: str, key_prefix: str) -> None:
    r = aioredis.from_url(redis_url)
    keys = Keys(key_prefix)
    store = JobStore(r, keys, ttl_s=60)
    a, b = await new_job(store, 6), await new_job(store, 2)
    # chunks commit out of order, interleaved with another job's
    await commit(store, a, 2, [4, 5])
    await commit(store, b, 0, [0])
    await commit(store, a, 0, [0, 1])
    await commit(store, a, 1, [2, 3])
    assert await rows_of(store, a) == [0, 1, 2, 3, 4, 5]
    assert await rows_of(store, b) == [0]
    # the stream holds every record once; the results are only chunk → entry range
    assert await r.xlen(keys.examples) == 7
    refs = await r.hgetall(keys.job_results(a))
    assert sorted(k.decode() for k in refs) == ["0:0", "0:1", "0:2"]
    assert all(len(v) < 40 for v in refs.values())
    # the trainer read and acked everything: both jobs are alive, so nothing may go yet
    assert await read_and_ack(r, keys) == 7
    assert await store.trim_examples() == 0
    assert await rows_of(store, a) == [0, 1, 2, 3, 4, 5]
    await r.aclose()


async def test_the_stream_is_trimmed_when_jobs_expire_never_before_the_trainer_acks(
    redis_url: str, key_prefix: str
) -> None:
    r = aioredis.from_url(redis_url)
    keys = Keys(key_prefix)
    short = JobStore(r, keys, ttl_s=1)
    long = JobStore(r, keys, ttl_s=60)
    old, unread, kept = await new_job(short, 2), await new_job(short, 2), await new_job(long, 4)
    await commit(short, old, 0, [0, 1])  # finishes the job: its keys expire in 1 s
    await read_and_ack(r, keys)
    await commit(short, unread, 0, [0, 1])  # finishes too, but the trainer has not read it yet
    await commit(long, kept, 0, [0, 1])
    await asyncio.sleep(1.2)
    assert await short.status(old) is None and await r.zscore(keys.examples_holds, old) is not None
    # the expired, acked job goes; the expired but unread one stays for the trainer
    assert await long.trim_examples() == 2
    assert await r.zscore(keys.examples_holds, old) is None
    assert await stream_jobs(r, keys) == [unread, unread, kept, kept]
    # read but not acked (a checkpoint not yet published): still kept
    assert await read_and_ack(r, keys, ack=False) == 4
    assert await long.trim_examples() == 0
    await r.xack(keys.examples, TRAINER_GROUP, *[i for i, _ in await r.xrange(keys.examples)])
    # acked now: the expired job's entries go, the live job's stay downloadable
    assert await long.trim_examples() == 2
    assert await stream_jobs(r, keys) == [kept, kept]
    await commit(long, kept, 1, [2, 3])
    assert await rows_of(long, kept) == [0, 1, 2, 3]
    await r.aclose()


async def test_nothing_is_trimmed_without_a_trainer_group(redis_url: str, key_prefix: str) -> None:
    r = aioredis.from_url(redis_url)
    keys = Keys(key_prefix)
    store = JobStore(r, keys, ttl_s=1)
    job = await new_job(store, 2)
    await commit(store, job, 0, [0, 1])
    await r.xgroup_destroy(keys.examples, TRAINER_GROUP)
    await asyncio.sleep(1.2)
    assert await store.trim_examples() == 0 and await r.xlen(keys.examples) == 2
    await r.aclose()
