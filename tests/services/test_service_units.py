"""Pure parts of the service: round-robin order, the engine gate, auth, settings, checkpoint names."""

from __future__ import annotations

import asyncio

import pytest

from services.auth import AuthError, Scope, authorize, bearer_token, check_bind, is_loopback
from services.policy_watcher import version_from_path
from services.scheduler import EngineGate, RoundRobin
from services.settings import ServiceConfig


def test_round_robin_starts_after_the_last_served_job() -> None:
    rr = RoundRobin()
    assert rr.order(["a", "b", "c"]) == ["a", "b", "c"]
    rr.served("a")
    assert rr.order(["a", "b", "c"]) == ["b", "c", "a"]
    rr.served("c")
    assert rr.order(["a", "b", "c"]) == ["a", "b", "c"]
    rr.served("b")
    assert rr.order(["a", "c"]) == ["c", "a"]  # the last served job may be gone


async def test_gate_exclusive_waits_for_running_batches_and_blocks_new_ones() -> None:
    gate = EngineGate()
    events: list[str] = []
    release = asyncio.Event()

    async def batch(name: str) -> None:
        async with gate.batch():
            events.append(f"{name} start")
            await release.wait()
            events.append(f"{name} end")

    async def reload() -> None:
        async with gate.exclusive():
            events.append("reload")

    first = asyncio.create_task(batch("first"))
    await asyncio.sleep(0.01)
    reloading = asyncio.create_task(reload())
    await asyncio.sleep(0.01)
    assert not gate.is_open
    second = asyncio.create_task(batch("second"))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(first, reloading, second)
    assert events == ["first start", "first end", "reload", "second start", "second end"]
    assert gate.is_open and gate.active == 0 and gate.busy_seconds() > 0


def test_authorize_scopes_and_constant_time_keys() -> None:
    cfg = ServiceConfig(api_keys=["k-user-1", "k-user-2"], admin_keys=["k-root"])
    authorize(cfg, "Bearer k-user-2", Scope.USER)
    authorize(cfg, "bearer k-root", Scope.ADMIN)
    authorize(cfg, "Bearer k-root", Scope.USER)
    for header, scope, status in [
        (None, Scope.USER, 401),
        ("Bearer", Scope.USER, 401),
        ("Token k-user-1", Scope.USER, 401),
        ("Bearer k-user-3", Scope.USER, 401),
        ("Bearer k-user-1x", Scope.USER, 401),
        ("Bearer k-user-1", Scope.ADMIN, 403),
    ]:
        with pytest.raises(AuthError) as err:
            authorize(cfg, header, scope)
        assert err.value.status == status
        assert "k-user" not in str(err.value) and "k-root" not in str(err.value)
    authorize(ServiceConfig(), None, Scope.ADMIN)  # no keys configured: open (loopback only, see below)
    assert bearer_token("Bearer  abc ") == "abc"


def test_no_keys_refuses_a_public_bind_unless_insecure() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        assert is_loopback(host)
        check_bind(ServiceConfig(host=host))
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match="--insecure"):
            check_bind(ServiceConfig(host=host))
        check_bind(ServiceConfig(host=host, insecure=True))
        check_bind(ServiceConfig(host=host, api_keys=["k"]))


def test_settings_from_env_split_keys_and_reject_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINDGAP_API_KEYS", "a, b,,c")
    monkeypatch.setenv("MINDGAP_ADMIN_KEYS", "root")
    monkeypatch.setenv("MINDGAP_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("MINDGAP_ENGINE__MODEL", "/models/x")
    cfg = ServiceConfig.load(None, port=9000)
    assert cfg.api_keys == ["a", "b", "c"] and cfg.admin_keys == ["root"] and cfg.auth_enabled
    assert cfg.redis_url == "redis://example:6380/2" and cfg.engine.model == "/models/x" and cfg.port == 9000
    shown = cfg.redacted()
    assert shown["api_keys"] == shown["admin_keys"] == "***"
    assert shown["key_prefix"] == cfg.key_prefix and shown["stages"]["max_tokens"] == cfg.stages.max_tokens
    with pytest.raises(ValueError, match="max_lagg"):
        ServiceConfig(max_lagg=3)  # type: ignore[call-arg]


def test_version_from_checkpoint_folder_name() -> None:
    assert version_from_path("/ckpt/v12") == 12
    assert version_from_path("/ckpt/v12/") == 12
    assert version_from_path("/ckpt/latest") is None
    assert version_from_path("/ckpt/v1x") is None
