"""`shared.retry`: which errors are retried, the bounded backoff, and log lines without credentials."""

from __future__ import annotations

import logging

import pytest
from redis.exceptions import BusyLoadingError, ConnectionError, ResponseError, TimeoutError

from shared.retry import Backoff, async_redis, retry_async, retry_sync, sync_redis

FAST = Backoff(base=0.001, cap=0.01, total_s=0.5)


async def test_transient_errors_are_retried_until_success(caplog: pytest.LogCaptureFixture) -> None:
    errors = [ConnectionError("refused"), TimeoutError("Timeout reading"), BusyLoadingError("loading"), OSError("x")]
    calls = 0

    async def op() -> str:
        nonlocal calls
        calls += 1
        if errors:
            raise errors.pop(0)
        return "ok"

    with caplog.at_level(logging.WARNING, "mindgap.retry"):
        assert await retry_async(op, "test op", FAST) == "ok"
    assert calls == 5
    assert len([r for r in caplog.records if "test op: Redis unavailable" in r.message]) == 4


async def test_answers_are_not_retried() -> None:
    calls = 0

    async def op() -> None:
        nonlocal calls
        calls += 1
        raise ResponseError("NOGROUP No such key")

    with pytest.raises(ResponseError):
        await retry_async(op, "test op", FAST)
    assert calls == 1


def test_gives_up_after_the_total_time_with_credentials_masked(caplog: pytest.LogCaptureFixture) -> None:
    def op() -> None:
        raise ConnectionError("Error connecting to redis://mindgap:hunter2@10.0.0.1:6379/0")

    with caplog.at_level(logging.WARNING, "mindgap.retry"), pytest.raises(ConnectionError):
        retry_sync(op, "test op", Backoff(base=0.01, cap=0.05, total_s=0.2))
    assert any("giving up" in r.message for r in caplog.records)
    assert "hunter2" not in caplog.text and "redis://***@10.0.0.1" in caplog.text


def test_backoff_grows_exponentially_with_full_jitter_under_the_cap() -> None:
    policy = Backoff(base=0.1, cap=1.0)
    for attempt in range(8):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= min(1.0, 0.1 * 2**attempt)
    assert max(policy.delay(6) for _ in range(200)) > 0.5  # capped at 1 s, not at 0.1 s


async def test_clients_carry_timeouts_and_retry() -> None:
    client = async_redis("redis://127.0.0.1:1/0", timeout_s=2.0)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 2.0
    assert kwargs["retry"].get_retries() == 4 and kwargs["health_check_interval"] == 15
    await client.aclose()
    blocking = sync_redis("redis://127.0.0.1:1/0", timeout_s=2.0)
    assert blocking.connection_pool.connection_kwargs["socket_timeout"] == 2.0
    blocking.close()


def _status(state: str) -> dict[str, object]:
    counts = {"self": 0, "guided": 0, "expert": 0}
    return {
        "id": "0123456789abcdef",
        "state": state,
        "mode": "once",
        "epochs": 1,
        "epoch": 0,
        "created_at": 0.0,
        "problems": 1,
        "rows_rejected": 0,
        "chunks": 1,
        "chunks_done": 0,
        "chunks_failed": 0,
        "problems_done": 0,
        "progress": 0.0,
        "stages": counts,
        "dropped": 0,
        "ungradable": 0,
        "examples": counts,
        "examples_total": 0,
        "generated_tokens": 0,
        "policy_versions": [],
        "errors": [],
        "params": {},
        "fields": {},
    }


def test_client_wait_rides_out_an_unavailable_service_but_not_a_client_error() -> None:
    import httpx

    from services.client import MindgapClient, ServiceError

    answers: list[httpx.Response | Exception] = [
        httpx.Response(503, json={"detail": "Redis is unavailable, retry later"}),
        httpx.ConnectError("refused"),
        httpx.Response(200, json=_status("running")),
        httpx.Response(503, json={"detail": "Redis is unavailable, retry later"}),
        httpx.Response(200, json=_status("completed")),
        httpx.Response(404, json={"detail": "unknown job"}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with MindgapClient("http://service", transport=httpx.MockTransport(handler)) as client:
        seen: list[str] = []
        final = client.wait("0123456789abcdef", poll_s=0.01, on_progress=lambda s: seen.append(s.state))
        assert final.state == "completed" and seen == ["running", "completed"]
        with pytest.raises(ServiceError) as err:
            client.wait("0123456789abcdef", poll_s=0.01)
        assert err.value.status == 404
