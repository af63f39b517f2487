"""The policy watcher: pub/sub and polled reloads, READY handshake, refused and failed checkpoints, admin reload,
and the version stamped on every later example."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.engine import Engine
from services.fake_engine import FakeEngine
from services.settings import ServiceConfig
from shared.keys import Keys
from shared.schema import Example
from shared.streams import field
from tests.support.service import FAST_PARAMS, arithmetic_rows, running_service, wait_for_job

pytestmark = pytest.mark.redis

ConfigFactory = Callable[..., ServiceConfig]


def checkpoint(root: Path, version: int, ready: bool = True) -> Path:
    path = root / f"v{version}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if ready:
        (path / "READY").touch()
    return path


async def publish(redis_url: str, key_prefix: str, version: int, path: Path, announce: bool = True) -> None:
    """What the trainer does: set the policy hash, then announce it."""
    keys = Keys(key_prefix)
    r = aioredis.from_url(redis_url)
    await r.hset(keys.policy, mapping={"version": version, "path": str(path)})
    if announce:
        await r.publish(keys.policy_events, str(version))
    await r.aclose()


async def policy_after(client, predicate, timeout: float = 10.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        policy = (await client.get("/v1/policy")).json()
        if predicate(policy):
            return policy
        assert asyncio.get_running_loop().time() < deadline, policy
        await asyncio.sleep(0.05)


class Engines:
    """An engine factory that keeps the engine it made, so a test can look at it."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.engine: FakeEngine | None = None
        self.fail_on = fail_on

    async def __call__(self, cfg: ServiceConfig) -> Engine:
        engine = FakeEngine()
        if self.fail_on is not None:
            real_reload, marker = engine.reload, self.fail_on

            async def reload(path: str) -> None:
                if marker in path:
                    raise RuntimeError("corrupt safetensors header")
                await real_reload(path)

            engine.reload = reload  # type: ignore[method-assign]
        self.engine = engine
        return engine


async def test_event_reload_stamps_the_new_version_on_later_examples(
    service_config: ConfigFactory, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    engines = Engines()
    async with running_service(service_config(policy_poll_s=30), engines) as (client, _):
        assert (await client.get("/v1/policy")).json() == {
            "version": 0,
            "path": None,
            "reloading": False,
            "history": [],
        }
        rows = {"rows": arithmetic_rows(2), "params": FAST_PARAMS}
        before = (await client.post("/v1/rewrite", json=rows)).json()
        await publish(redis_url, key_prefix, 1, checkpoint(tmp_path, 1))  # the event, not the 30 s poll
        policy = await policy_after(client, lambda p: p["version"] == 1)
        (record,) = policy["history"]
        assert record["outcome"] == "loaded" and record["source"] == "event" and record["path"].endswith("v1")
        assert record["duration_s"] >= 0 and record["error"] is None
        assert engines.engine is not None and engines.engine.version == 1
        after = (await client.post("/v1/rewrite", json=rows)).json()
        assert {e["policy_version"] for e in before["examples"]} == {0}
        assert {e["policy_version"] for e in after["examples"]} == {1}
        assert 'mindgap_policy_reloads_total{outcome="loaded"} 1.0' in (await client.get("/metrics")).text


async def test_polling_catches_a_missed_event_and_startup_loads_the_current_version(
    service_config: ConfigFactory, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    await publish(redis_url, key_prefix, 3, checkpoint(tmp_path, 3), announce=False)
    async with running_service(service_config()) as (client, _):
        policy = (await client.get("/v1/policy")).json()
        assert policy["version"] == 3 and policy["history"][0]["source"] == "startup"
        await publish(redis_url, key_prefix, 4, checkpoint(tmp_path, 4), announce=False)
        policy = await policy_after(client, lambda p: p["version"] == 4)
        assert policy["history"][-1]["source"] in ("poll", "event")


async def test_checkpoint_without_ready_or_failing_to_load_is_refused_and_old_weights_serve(
    service_config: ConfigFactory, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    engines = Engines(fail_on="v2")
    async with running_service(service_config(), engines) as (client, _):
        await publish(redis_url, key_prefix, 1, checkpoint(tmp_path, 1, ready=False))
        policy = await policy_after(client, lambda p: len(p["history"]) == 1)
        assert policy["version"] == 0 and policy["history"][0]["outcome"] == "refused"
        assert "READY" in policy["history"][0]["error"]

        await publish(redis_url, key_prefix, 2, checkpoint(tmp_path, 2))
        policy = await policy_after(client, lambda p: len(p["history"]) == 2)
        assert policy["version"] == 0 and policy["history"][1]["outcome"] == "failed"
        assert "corrupt safetensors header" in policy["history"][1]["error"]
        await asyncio.sleep(0.5)  # polling does not retry a refused checkpoint
        assert len((await client.get("/v1/policy")).json()["history"]) == 2

        resp = await client.post("/v1/rewrite", json={"rows": arithmetic_rows(1), "params": FAST_PARAMS})
        assert resp.status_code == 200 and resp.json()["policy_version"] == 0
        assert engines.engine is not None and engines.engine.version == 0

        await publish(redis_url, key_prefix, 3, checkpoint(tmp_path, 3))  # a good one later is taken
        await policy_after(client, lambda p: p["version"] == 3)


async def test_admin_reload_endpoint(service_config: ConfigFactory, tmp_path: Path) -> None:
    async with running_service(service_config(admin_keys="root")) as (client, _):
        admin = {"Authorization": "Bearer root"}
        resp = await client.post("/v1/policy/reload", json={"path": str(checkpoint(tmp_path, 7))}, headers=admin)
        assert resp.status_code == 200 and resp.json()["version"] == 7 and resp.json()["source"] == "admin"
        other = tmp_path / "latest"
        other.mkdir()
        (other / "READY").touch()
        resp = await client.post("/v1/policy/reload", json={"path": str(other)}, headers=admin)
        assert resp.json()["version"] == 8  # no v<N> name: the next version
        resp = await client.post(
            "/v1/policy/reload", json={"path": str(checkpoint(tmp_path, 9, ready=False))}, headers=admin
        )
        assert resp.status_code == 422 and "READY" in resp.json()["detail"] and "v8" in resp.json()["detail"]
        assert (await client.get("/v1/policy", headers=admin)).json()["version"] == 8


async def test_online_job_examples_follow_reloads_in_stream_order(
    service_config: ConfigFactory, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    cfg = service_config(fake_delay_s=0.01, chunk_size=1)
    async with running_service(cfg) as (client, _):
        body = {"rows": arithmetic_rows(4), "params": FAST_PARAMS, "mode": "online"}
        job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
        for version in (1, 2):
            done = (await client.get(f"/v1/jobs/{job_id}")).json()["problems_done"]
            while (await client.get(f"/v1/jobs/{job_id}")).json()["problems_done"] < done + 3:
                await asyncio.sleep(0.05)
            await publish(redis_url, key_prefix, version, checkpoint(tmp_path, version))
            await policy_after(client, lambda p, v=version: p["version"] == v)
        done = (await client.get(f"/v1/jobs/{job_id}")).json()["problems_done"]
        while (await client.get(f"/v1/jobs/{job_id}")).json()["problems_done"] < done + 3:
            await asyncio.sleep(0.05)
        await client.post(f"/v1/jobs/{job_id}/cancel")
        status = await wait_for_job(client, job_id, ("cancelled",))
    assert status["policy_versions"] == [0, 1, 2]
    r = aioredis.from_url(redis_url)
    entries = await r.xrange(Keys(key_prefix).examples)
    await r.aclose()
    versions = [Example.model_validate_json(field(e, "data") or "").policy_version for _, e in entries]
    assert versions == sorted(versions) and set(versions) == {0, 1, 2}
