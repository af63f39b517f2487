"""The service on the real vLLM engine (the session's shared tiny model): two concurrent jobs complete
and their examples are in the stream, with the engine's own token ids and log-probs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.engine import Engine
from services.settings import ServiceConfig
from services.vllm_engine import VLLMEngine
from shared.keys import Keys
from shared.schema import Example
from shared.streams import field
from tests.support.service import arithmetic_rows, running_service, wait_for_job

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.redis, pytest.mark.asyncio(loop_scope="session")]


class Borrowed:
    """The session's engine lent to one app: the app's shutdown must not stop it."""

    def __init__(self, engine: VLLMEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def shutdown(self) -> None:
        """Keep the shared engine running."""


async def test_two_concurrent_jobs_on_vllm_complete_into_the_stream(
    vllm_tiny_engine: VLLMEngine, service_config: Callable[..., ServiceConfig], redis_url: str, key_prefix: str
) -> None:
    async def lend(cfg: ServiceConfig) -> Engine:
        return Borrowed(vllm_tiny_engine)  # type: ignore[return-value]

    params = {"k": 2, "resolve_attempts": 1, "max_tokens": 24, "rounds": 1}
    cfg = service_config(chunk_size=1, max_inflight_chunks=4, backend="vllm")
    async with running_service(cfg, lend) as (client, _):
        jobs = []
        for start in (0, 10):
            resp = await client.post("/v1/jobs", json={"rows": arithmetic_rows(2, start), "params": params})
            assert resp.status_code == 201, resp.text
            jobs.append(resp.json()["id"])
        statuses = await asyncio.gather(*(wait_for_job(client, j, timeout=300) for j in jobs))
        for status in statuses:
            assert status["problems_done"] == 2 and status["chunks_failed"] == 0
            assert status["generated_tokens"] > 0 and status["examples_total"] >= 2
        # both jobs were on the engine at the same time
        (first, second) = statuses
        assert second["started_at"] < first["finished_at"] and first["started_at"] < second["finished_at"]

    r = aioredis.from_url(redis_url)
    entries = await r.xrange(Keys(key_prefix).examples)
    await r.aclose()
    examples = [Example.model_validate_json(field(e, "data") or "") for _, e in entries]
    assert len(examples) == sum(s["examples_total"] for s in statuses)
    assert {e.problem_id for e in examples} == {"1", "2"}  # row numbers of each job
    assert len({e.id for e in examples}) == len(examples)
    for ex in examples:
        assert len(ex.completion_token_ids) > 0
        assert ex.target_logprobs is None  # online jobs do not score unless params.score asks
        assert ex.policy_version == 0
