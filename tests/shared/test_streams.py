"""Stream helpers against a real throwaway redis-server: idempotent publish, lag, backpressure, dead letters."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from shared.keys import TRAINER_GROUP, Keys
from shared.schema import ChatMessage, Example, Sampling, Stage
from shared.streams import dead_letter, field, group_lag, publish_examples, wait_for_capacity

pytestmark = pytest.mark.redis


def make_example(i: int) -> Example:
    return Example(
        id=f"ex{i}",
        problem_id=str(i),
        prompt=[ChatMessage(role="user", content=f"q{i}")],
        completion=[ChatMessage(role="assistant", content=f"a{i}")],
        completion_token_ids=[1, 2],
        stage=Stage.SELF,
        policy_version=0,
        sampling=Sampling(temperature=0.7, top_p=1.0),
        behavior_logprobs=[-0.1, -0.2],
        target_logprobs=[-0.1, -0.3],
        answer="1",
        grade="correct",
    )


async def test_publish_is_idempotent_and_lag_counts_undelivered(redis_url: str, key_prefix: str) -> None:
    r = aioredis.from_url(redis_url)
    keys = Keys(key_prefix)
    assert await publish_examples(r, keys, "job1", [make_example(0), make_example(1)]) == 2
    # redelivery of the same work adds nothing to the stream or the results
    assert await publish_examples(r, keys, "job1", [make_example(1), make_example(2)]) == 1
    assert await r.xlen(keys.examples) == 3
    assert await r.scard(keys.job_published("job1")) == 3
    assert await group_lag(r, keys.examples, TRAINER_GROUP) == 3
    entries = await r.xreadgroup(TRAINER_GROUP, "c1", {keys.examples: ">"}, count=2)
    assert [field(e, "id") for _, e in entries[0][1]] == ["ex0", "ex1"]
    assert await group_lag(r, keys.examples, TRAINER_GROUP) == 1
    await r.aclose()


async def test_backpressure_waits_until_the_group_reads(redis_url: str, key_prefix: str) -> None:
    r = aioredis.from_url(redis_url)
    keys = Keys(key_prefix)
    await publish_examples(r, keys, "j", [make_example(i) for i in range(5)])
    with pytest.raises(TimeoutError):
        await wait_for_capacity(r, keys.examples, TRAINER_GROUP, max_lag=2, poll_s=0.05, timeout_s=0.3)

    async def consume_later() -> None:
        await asyncio.sleep(0.2)
        await r.xreadgroup(TRAINER_GROUP, "c1", {keys.examples: ">"}, count=4)

    consumer = asyncio.create_task(consume_later())
    waited = await wait_for_capacity(r, keys.examples, TRAINER_GROUP, max_lag=2, poll_s=0.05, timeout_s=5)
    await consumer
    assert waited >= 0.15
    assert await r.xlen(keys.examples) == 5  # nothing was trimmed
    await r.aclose()


async def test_dead_letter_keeps_reason(redis_url: str, key_prefix: str) -> None:
    r = aioredis.from_url(redis_url, decode_responses=True)
    keys = Keys(key_prefix)
    await dead_letter(r, keys, "trainer", "1-0", {"data": "{bad"}, "invalid JSON at line 1")
    ((_entry_id, entry),) = await r.xrange(keys.deadletter)
    assert field(entry, "reason") == "invalid JSON at line 1"
    assert field(entry, "entry_id") == "1-0"
    await r.aclose()
