"""The `/v1` API on the fake engine against a real throwaway redis-server: every endpoint and error code."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis.asyncio as aioredis

from services.settings import ServiceConfig
from shared.keys import Keys
from shared.schema import Example
from shared.streams import field
from tests.support.service import FAST_PARAMS, arithmetic_rows, running_service, wait_for_job

pytestmark = pytest.mark.redis

ConfigFactory = Callable[..., ServiceConfig]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


async def test_inline_job_runs_to_completion_with_results_stream_and_counts(
    service_config: ConfigFactory, redis_url: str, key_prefix: str
) -> None:
    rows = arithmetic_rows(5)
    async with running_service(service_config()) as (client, _):
        resp = await client.post("/v1/jobs", json={"rows": rows, "params": FAST_PARAMS, "name": "demo"})
        assert resp.status_code == 201, resp.text
        created = resp.json()
        assert created["problems"] == 5 and created["chunks"] == 3 and created["rows_rejected"] == 0
        status = await wait_for_job(client, created["id"])
        assert status["progress"] == 1.0 and status["problems_done"] == 5 and status["name"] == "demo"
        assert sum(status["stages"].values()) + status["dropped"] == 5
        assert status["policy_versions"] == [0]
        assert status["params"]["k"] == 2

        lines = (await client.get(f"/v1/jobs/{created['id']}/results")).text.splitlines()
        examples = [Example.model_validate_json(line) for line in lines]
        assert sorted(e.problem_id for e in examples) == ["1", "2", "3", "4", "5"]
        assert len(examples) == status["examples_total"]

        listing = (await client.get("/v1/jobs")).json()["jobs"]
        assert [j["id"] for j in listing] == [created["id"]]

    r = aioredis.from_url(redis_url)
    entries = await r.xrange(Keys(key_prefix).examples)
    assert sorted(field(e, "id") for _, e in entries) == sorted(e.id for e in examples)
    await r.aclose()


async def test_upload_jsonl_reports_bad_rows_by_line_and_parquet_results(service_config: ConfigFactory) -> None:
    data = jsonl([*arithmetic_rows(2), {"problem_text": "no question"}]) + b"{not json\n"
    spec = {"params": FAST_PARAMS}
    async with running_service(service_config()) as (client, _):
        resp = await client.post("/v1/jobs", files={"file": ("data.jsonl", data)}, data={"spec": json.dumps(spec)})
        assert resp.status_code == 201, resp.text
        created = resp.json()
        assert created["problems"] == 2 and created["rows_rejected"] == 2
        assert [e["line"] for e in created["errors"]] == [3, 4]
        status = await wait_for_job(client, created["id"])
        assert [e["line"] for e in status["errors"]] == [3, 4]
        assert "invalid JSON" in status["errors"][1]["message"]

        resp = await client.get(f"/v1/jobs/{created['id']}/results", params={"format": "parquet"})
        assert resp.status_code == 200
        table = pq.read_table(io.BytesIO(resp.content))
        assert table.num_rows == status["examples_total"]


async def test_upload_parquet_with_field_mapping(service_config: ConfigFactory) -> None:
    rows = [{"problem": r["question"], "final": r["answer"]} for r in arithmetic_rows(3)]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    spec = {"fields": {"question": "problem", "answer": "final"}, "params": FAST_PARAMS}
    async with running_service(service_config()) as (client, _):
        resp = await client.post(
            "/v1/jobs", files={"file": ("d.parquet", buffer.getvalue())}, data={"spec": json.dumps(spec)}
        )
        assert resp.status_code == 201, resp.text
        status = await wait_for_job(client, resp.json()["id"])
        assert status["fields"] == {"question": "problem", "answer": "final"}
        assert status["problems_done"] == 3


async def test_server_side_path_under_root_and_403_outside(service_config: ConfigFactory, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "data.jsonl").write_bytes(jsonl(arithmetic_rows(2)))
    outside = tmp_path / "secret.jsonl"
    outside.write_bytes(jsonl(arithmetic_rows(1)))
    (root / "escape.jsonl").symlink_to(outside)
    (root / "inside-link.jsonl").symlink_to(root / "sub" / "data.jsonl")

    async with running_service(service_config(allowed_root=root)) as (client, _):
        for path in ("sub/data.jsonl", str(root / "sub" / "data.jsonl"), "inside-link.jsonl", "sub/../sub/data.jsonl"):
            resp = await client.post("/v1/jobs", json={"path": path, "params": FAST_PARAMS})
            assert resp.status_code == 201, (path, resp.text)
        for path in ("../secret.jsonl", str(outside), "escape.jsonl", "sub/../../secret.jsonl", "/etc/passwd"):
            resp = await client.post("/v1/jobs", json={"path": path})
            assert resp.status_code == 403, (path, resp.text)
            assert "outside the allowed root" in resp.json()["detail"]
        resp = await client.post("/v1/jobs", json={"path": "sub/missing.jsonl"})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "path"]

    async with running_service(service_config()) as (client, _):  # no allowed_root: paths disabled
        resp = await client.post("/v1/jobs", json={"path": "sub/data.jsonl"})
        assert resp.status_code == 403 and "allowed_root" in resp.json()["detail"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"rows": arithmetic_rows(1), "params": {"k": -1}}, ["body", "params", "k"]),
        ({"rows": arithmetic_rows(1), "params": {"nope": 1}}, ["body", "params", "nope"]),
        ({"rows": arithmetic_rows(1), "fields": {"quest": "problem"}}, ["body", "fields"]),
        ({"rows": arithmetic_rows(1), "fields": {"question": "absent"}}, ["body"]),
        ({"rows": arithmetic_rows(1), "mode": "once", "epochs": 3}, ["body"]),
        ({"rows": arithmetic_rows(1), "mode": "sometimes"}, ["body", "mode"]),
        ({"rows": arithmetic_rows(1), "path": "x.jsonl"}, ["body"]),
        ({}, ["body"]),
        ({"rows": [{"text": "no question here"}]}, ["body"]),
        ({"rows": "not a list"}, ["body", "rows"]),
    ],
)
async def test_bad_json_job_requests_are_422_naming_the_field(
    service_config: ConfigFactory, body: dict, loc: list
) -> None:
    async with running_service(service_config()) as (client, _):
        resp = await client.post("/v1/jobs", json=body)
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"]
        assert detail[0]["loc"] == loc
        if body.get("rows") == [{"text": "no question here"}]:
            assert "line 1" in detail[0]["msg"]


async def test_client_errors_never_become_500(service_config: ConfigFactory) -> None:
    async with running_service(service_config()) as (client, _):
        bad = [
            client.post("/v1/jobs", content=b"{broken", headers={"content-type": "application/json"}),
            client.post("/v1/jobs", content=b"\xff\xfe", headers={"content-type": "application/json"}),
            client.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}),
            client.post("/v1/jobs", files={"file": ("d.parquet", b"not parquet")}),
            client.post("/v1/jobs", files={"file": ("d.jsonl", b"\x00\x01\x02")}),
            client.post("/v1/jobs", files={"file": ("d.json", b"[1, 2")}),
            client.post("/v1/jobs", files={"file": ("d.jsonl", b"{}")}, data={"spec": "{not json"}),
            client.post("/v1/jobs", files={"file": ("d.jsonl", b"{}")}, data={"spec": '{"mode": 3}'}),
            client.post("/v1/jobs", data={"spec": "{}"}, files={"other": ("d.jsonl", b"{}")}),
            client.post(
                "/v1/jobs", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}
            ),
            client.post("/v1/rewrite", json={"rows": []}),
            client.post("/v1/rewrite", json={"rows": [{"question": "What is 1+1?"}], "params": {"top_p": 5}}),
            client.get("/v1/jobs", params={"limit": 0}),
            client.get("/v1/jobs/0123456789abcdef/results", params={"format": "xml"}),
            client.post("/v1/policy/reload", json={"path": ""}),
            client.post("/v1/policy/reload", json={"path": "/nonexistent/v3"}),
        ]
        for call in bad:
            resp = await call
            assert 400 <= resp.status_code < 500, (resp.request.url, resp.status_code, resp.text)


async def test_unknown_job_is_404_and_cancel_of_finished_is_409(service_config: ConfigFactory) -> None:
    async with running_service(service_config()) as (client, _):
        for job_id in ("0123456789abcdef", "..%2F..", "x:results"):
            assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 404
            assert (await client.get(f"/v1/jobs/{job_id}/results")).status_code == 404
            assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 404
        job_id = (await client.post("/v1/jobs", json={"rows": arithmetic_rows(1), "params": FAST_PARAMS})).json()["id"]
        await wait_for_job(client, job_id)
        resp = await client.post(f"/v1/jobs/{job_id}/cancel")
        assert resp.status_code == 409 and "completed" in resp.json()["detail"]


async def test_cancel_stops_a_running_job(service_config: ConfigFactory) -> None:
    cfg = service_config(fake_delay_s=0.05, max_inflight_chunks=1)
    async with running_service(cfg) as (client, _):
        job_id = (await client.post("/v1/jobs", json={"rows": arithmetic_rows(20), "params": FAST_PARAMS})).json()["id"]
        await wait_for_job(client, job_id, ("running",))
        resp = await client.post(f"/v1/jobs/{job_id}/cancel")
        assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
        status = await wait_for_job(client, job_id, ("cancelled",))
        assert status["finished_at"] is not None and status["problems_done"] < 20
        assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 409


async def test_sync_rewrite_and_its_bounds(service_config: ConfigFactory) -> None:
    async with running_service(service_config(max_sync_rows=3)) as (client, _):
        resp = await client.post("/v1/rewrite", json={"rows": arithmetic_rows(2), "params": FAST_PARAMS})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["policy_version"] == 0 and sum(body["stages"].values()) == 2
        assert {e["problem_id"] for e in body["examples"]} == {"1", "2"}

        resp = await client.post("/v1/rewrite", json={"rows": arithmetic_rows(4)})
        assert resp.status_code == 413 and "at most 3" in resp.json()["detail"]
        resp = await client.post("/v1/rewrite", json={"rows": [*arithmetic_rows(1), {"q": "x"}]})
        assert resp.status_code == 422 and "line 2" in resp.json()["detail"][0]["msg"]


async def test_oversized_bodies_are_413(service_config: ConfigFactory) -> None:
    async with running_service(service_config(max_upload_bytes=2000)) as (client, _):
        big = jsonl(arithmetic_rows(200))
        resp = await client.post("/v1/jobs", files={"file": ("d.jsonl", big)})
        assert resp.status_code == 413

        async def chunks():  # no Content-Length: the limit applies while the body streams in
            for start in range(0, len(big), 500):
                yield big[start : start + 500]

        resp = await client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert resp.status_code == 413
        resp = await client.post("/v1/jobs", json={"rows": arithmetic_rows(1), "params": FAST_PARAMS})
        assert resp.status_code == 201


async def test_auth_keys_and_admin_scope(service_config: ConfigFactory, tmp_path: Path) -> None:
    cfg = service_config(api_keys="user-key,other-key", admin_keys=["admin-key"])
    ckpt = tmp_path / "v1"
    ckpt.mkdir()
    (ckpt / "READY").touch()
    async with running_service(cfg) as (client, _):
        assert (await client.get("/v1/jobs")).status_code == 401
        assert (await client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await client.get("/v1/jobs", headers={"Authorization": "Basic user-key"})).status_code == 401
        for key in ("user-key", "other-key", "admin-key"):
            assert (await client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        user, admin = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}
        assert (await client.post("/v1/rewrite", json={"rows": arithmetic_rows(1)})).status_code == 401
        assert (await client.get("/v1/policy", headers=user)).status_code == 200
        assert (await client.post("/v1/policy/reload", json={"path": str(ckpt)}, headers=user)).status_code == 403
        resp = await client.post("/v1/policy/reload", json={"path": str(ckpt)}, headers=admin)
        assert resp.status_code == 200 and resp.json()["version"] == 1
        # probes and metrics stay open
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200
        assert "user-key" not in (await client.get("/metrics")).text


async def test_health_metrics_and_openapi(service_config: ConfigFactory) -> None:
    async with running_service(service_config()) as (client, _):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] is True
        job_id = (await client.post("/v1/jobs", json={"rows": arithmetic_rows(3), "params": FAST_PARAMS})).json()["id"]
        await wait_for_job(client, job_id)
        text = (await client.get("/metrics")).text
        for name in (
            "mindgap_problems_total",
            "mindgap_examples_total",
            "mindgap_generated_tokens_total",
            "mindgap_batch_problems_bucket",
            "mindgap_engine_busy_fraction",
            "mindgap_stream_lag",
            'mindgap_jobs_submitted_total{mode="once"} 1.0',
        ):
            assert name in text, name
        problems = sum(
            float(line.split()[-1]) for line in text.splitlines() if line.startswith("mindgap_problems_total{")
        )
        assert problems == 3
        spec = (await client.get("/openapi.json")).json()
        assert {
            "/v1/jobs",
            "/v1/jobs/{job_id}",
            "/v1/jobs/{job_id}/results",
            "/v1/jobs/{job_id}/cancel",
            "/v1/rewrite",
            "/v1/policy",
            "/v1/policy/reload",
            "/healthz",
            "/readyz",
            "/metrics",
        } <= set(spec["paths"])
        body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
        assert {"application/json", "multipart/form-data"} <= set(body)


async def test_readyz_is_503_when_redis_is_unreachable(service_config: ConfigFactory) -> None:
    async with running_service(service_config()) as (client, app):
        state = app.state.mindgap
        real = state.redis
        state.redis = aioredis.from_url("redis://127.0.0.1:1/0")
        try:
            resp = await client.get("/readyz")
            assert resp.status_code == 503 and resp.json()["redis"] is False
        finally:
            await state.redis.aclose()
            state.redis = real
