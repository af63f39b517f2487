"""The policy watcher: pub/sub and polled reloads, READY handshake, refused and failed checkpoints, admin reload,
the version stamped on every later example, corrupt policy hashes and rollbacks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from services.engine import Engine
from services.fake_engine import FakeEngine
from services.policy_watcher import PolicyHashError, parse_policy
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
            "error": None,
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


@pytest.mark.parametrize(
    ("version", "problem"),
    [(b"abc", "'abc' is not an integer"), (b"-1", "'-1' is not an integer"), (str(2**63).encode(), "not an integer")],
)
def test_parse_policy_refuses_what_is_not_a_version(version: bytes, problem: str) -> None:
    with pytest.raises(PolicyHashError, match=problem):
        parse_policy(version, b"/ckpt/v1")


def test_parse_policy_reads_the_trainers_hash() -> None:
    assert parse_policy(None, None) is None  # nothing published yet
    assert parse_policy(str(2**63 - 1).encode(), b"/ckpt/last") == (2**63 - 1, "/ckpt/last")
    with pytest.raises(PolicyHashError, match="no checkpoint path"):
        parse_policy(b"3", None)
    with pytest.raises(PolicyHashError, match="no version"):
        parse_policy(None, b"/ckpt/v3")


async def corrupt_hash(r: aioredis.Redis, keys: Keys, how: str) -> None:
    """What a careless operator or a broken script does to the policy key."""
    if how == "wrong type":
        await r.set(keys.policy, "v3")
    else:
        await r.hset(keys.policy, mapping={"version": how, "path": "/ckpt/v3"})


@pytest.mark.parametrize("how", ["abc", str(2**63), "wrong type"])
async def test_a_corrupt_policy_hash_is_reported_and_the_watcher_takes_the_next_valid_version(
    how: str,
    service_config: ConfigFactory,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = Keys(key_prefix)
    r = aioredis.from_url(redis_url)
    await corrupt_hash(r, keys, how)  # already corrupt when the service starts: it must start anyway
    async with running_service(service_config(policy_poll_s=0.1)) as (client, _):
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "degraded" and "unusable" in ready.json()["policy_error"]
        policy = (await client.get("/v1/policy")).json()
        assert policy["version"] == 0 and "unusable" in policy["error"] and "still serving v0" in policy["error"]
        assert "mindgap_policy_hash_error 1.0" in (await client.get("/metrics")).text
        await asyncio.sleep(0.5)  # several polls
        logged = [rec for rec in caplog.records if rec.name == "mindgap.policy" and "unusable" in rec.message]
        assert len(logged) == 1 and logged[0].levelname == "ERROR"  # at once, and once

        await r.delete(keys.policy)
        await publish(redis_url, key_prefix, 2, checkpoint(tmp_path, 2))
        policy = await policy_after(client, lambda p: p["version"] == 2)
        assert policy["error"] is None
        assert (await client.get("/readyz")).json()["status"] == "ready"
        watcher_task = next(t for t in asyncio.all_tasks() if t.get_name() == "mindgap-policy")
        assert not watcher_task.done()

        await corrupt_hash(r, keys, how)  # corrupted while running: reported, the watcher lives on
        await policy_after(client, lambda p: p["error"] is not None)
        await r.delete(keys.policy)
        await publish(redis_url, key_prefix, 3, checkpoint(tmp_path, 3))
        await policy_after(client, lambda p: p["version"] == 3 and p["error"] is None)
        assert not watcher_task.done()
    await r.aclose()


async def test_versions_only_go_forward_unless_an_admin_forces_a_rollback(
    service_config: ConfigFactory, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with running_service(service_config(admin_keys="root", policy_poll_s=0.1)) as (client, _):
        client.headers["Authorization"] = "Bearer root"

        async def reload(version: int, **extra: object) -> httpx.Response:
            path = tmp_path / f"v{version}"
            if not path.exists():
                checkpoint(tmp_path, version)
            return await client.post("/v1/policy/reload", json={"path": str(path), **extra})

        assert (await reload(5)).status_code == 200
        for older in (await reload(3), await reload(5)):  # older, or the same again
            assert older.status_code == 409 and "allow_rollback" in older.json()["detail"], older.text
        assert (await client.get("/v1/policy")).json()["version"] == 5
        resp = await reload(3, allow_rollback=True)
        assert resp.status_code == 200 and resp.json()["version"] == 3

        # the trainer's hash does not undo the rollback with a version the service already moved past …
        await publish(redis_url, key_prefix, 4, checkpoint(tmp_path, 4))
        await asyncio.sleep(0.5)
        assert (await client.get("/v1/policy")).json()["version"] == 3
        # … but a newer one is taken as usual
        await publish(redis_url, key_prefix, 6, checkpoint(tmp_path, 6))
        await policy_after(client, lambda p: p["version"] == 6)


def test_the_client_asks_for_a_rollback_only_when_told() -> None:
    from services.client import MindgapClient

    bodies: list[dict[str, object]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        record = {"time": 0.0, "version": 3, "path": "/ckpt/v3", "duration_s": 0.1, "outcome": "loaded"}
        return httpx.Response(200, json=record | {"source": "admin"})

    with MindgapClient("http://service", "root", transport=httpx.MockTransport(answer)) as client:
        client.reload("/ckpt/v3")
        client.reload("/ckpt/v3", 3, allow_rollback=True)
    assert bodies == [{"path": "/ckpt/v3"}, {"path": "/ckpt/v3", "version": 3, "allow_rollback": True}]
