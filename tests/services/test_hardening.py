"""Hostile and careless requests: every stage parameter and job size is bounded (422 naming the field and the
limit, before any work), rows nested or sized past the limits are rejected by line, big inputs are parsed off
the event loop, auth comes before the body is read, and the OpenAPI document, /docs and error texts hold up."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.settings import RequestLimits, ServiceConfig
from tests.support.service import FAST_PARAMS, SERVE_MEMORY_CAP, ServeProcess, arithmetic_rows, running_service

pytestmark = pytest.mark.redis

ConfigFactory = Callable[..., ServiceConfig]

USER_KEY = "user-key-hardening-1"
ADMIN_KEY = "admin-key-hardening-2"
USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
HUGE = 10**24
# rows in the upload that must not stall the event loop: reading them takes seconds (the issue saw /healthz
# blocked 8.4 s by 100k), enough to tell a stalled loop from a free one
BIG_UPLOAD_ROWS = 40_000


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def locs(resp: httpx.Response) -> list[list[Any]]:
    return [e["loc"] for e in resp.json()["detail"]]


def nested_list(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


# ------------------------------------------------------------------------------ stage parameters, job size


async def test_stage_parameters_over_their_limits_are_422_naming_the_field_before_any_work(
    service_config: ConfigFactory,
) -> None:
    over = {"k": HUGE, "resolve_attempts": 65, "keep": 10**9, "rounds": 10**7, "max_tokens": 10**6}
    async with running_service(service_config()) as (client, _):
        started = time.monotonic()
        for name, value in over.items():
            params = FAST_PARAMS | {name: value}
            resp = await asyncio.wait_for(
                client.post("/v1/jobs", json={"rows": arithmetic_rows(2), "params": params}), 10
            )
            assert resp.status_code == 422, (name, resp.text)
            assert locs(resp) == [["body", "params", name]]
            assert f"limits.{name}" in resp.text
            resp = await asyncio.wait_for(
                client.post("/v1/rewrite", json={"rows": arithmetic_rows(1), "params": params}), 10
            )
            assert resp.status_code == 422 and locs(resp) == [["body", "params", name]], (name, resp.text)
            spec = {"params": params}
            resp = await client.post(
                "/v1/jobs", files={"file": ("d.jsonl", jsonl(arithmetic_rows(2)))}, data={"spec": json.dumps(spec)}
            )
            assert resp.status_code == 422 and locs(resp) == [["body", "spec", "params", name]], (name, resp.text)
        resp = await client.post("/v1/jobs", json={"rows": arithmetic_rows(1), "mode": "online", "epochs": 10**9})
        assert resp.status_code == 422 and locs(resp) == [["body", "epochs"]], resp.text
        assert time.monotonic() - started < 10  # all of them answered at once: nothing was sampled
        assert (await client.get("/v1/jobs")).json()["jobs"] == []  # and no job was created


async def test_the_operator_sets_the_limits_and_the_defaults_must_fit_them(service_config: ConfigFactory) -> None:
    limits = {"k": 2, "samples_per_job": 12}
    async with running_service(service_config(limits=limits, stages=FAST_PARAMS)) as (client, _):
        resp = await client.post("/v1/jobs", json={"rows": arithmetic_rows(1), "params": FAST_PARAMS | {"k": 3}})
        assert resp.status_code == 422 and "limit of 2 (limits.k)" in resp.text
        # 3 problems × (2 + 2) samples = 12: at the limit; a fourth problem, or a second epoch, is over it
        resp = await client.post("/v1/jobs", json={"rows": arithmetic_rows(3), "params": FAST_PARAMS})
        assert resp.status_code == 201, resp.text
        resp = await client.post("/v1/jobs", json={"rows": arithmetic_rows(4), "params": FAST_PARAMS})
        assert resp.status_code == 422 and "limits.samples_per_job" in resp.text and locs(resp) == [["body"]]
        online = {"rows": arithmetic_rows(3), "params": FAST_PARAMS, "mode": "online", "epochs": 2}
        resp = await client.post("/v1/jobs", json=online)
        assert resp.status_code == 422 and "limits.samples_per_job" in resp.text
    with pytest.raises(ValueError, match=r"limits\.k"):
        service_config(limits={"k": 2}, stages={"k": 4})
    assert ServiceConfig(limits=RequestLimits(k=128), stages={"k": 100}).limits.k == 128


async def test_a_server_side_file_past_the_samples_limit_is_not_read_to_the_end(
    service_config: ConfigFactory, tmp_path: Path
) -> None:
    rows = arithmetic_rows(50)
    (tmp_path / "big.jsonl").write_bytes(jsonl(rows) + b"{broken\n")  # the broken last line is never reached
    cfg = service_config(allowed_root=tmp_path, limits={"samples_per_job": 40})
    async with running_service(cfg) as (client, _):
        resp = await client.post("/v1/jobs", json={"path": "big.jsonl", "params": FAST_PARAMS})
        assert resp.status_code == 422, resp.text
        assert "more than 10 problems at 4 samples each" in resp.text


# ------------------------------------------------------------------------------------ depth and size


async def test_rows_nested_too_deep_or_too_large_are_rejected_by_line_never_a_500(
    service_config: ConfigFactory,
) -> None:
    deep_line = '{"question": ' + nested_list(100_000) + ', "answer": "1"}'
    list_900 = '{"question": ' + nested_list(900) + ', "answer": "1"}'
    wide = json.dumps({"question": "What is 1+1? " + "x" * 500, "answer": "2"})
    long_number = '{"question": "What is 1+1?", "answer": ' + "9" * 5000 + "}"  # past Python's 4300 digits
    upload = "\n".join([json.dumps(arithmetic_rows(1)[0]), deep_line, list_900, wide, long_number]).encode()
    cfg = service_config(limits={"row_chars": 400})
    async with running_service(cfg) as (client, _):
        resp = await client.post("/v1/jobs", files={"file": ("d.jsonl", upload)}, data={"spec": '{"params": {"k": 1}}'})
        assert resp.status_code == 201, resp.text
        errors = {e["line"]: e["message"] for e in resp.json()["errors"]}
        assert errors.keys() == {2, 3, 4, 5}
        assert "nested too deep" in errors[2]
        assert "limits.json_depth" in errors[3]
        assert "limits.row_chars" in errors[4]
        assert "unreadable JSON" in errors[5]
        # the same rows inline, as a job or a synchronous rewrite: a 4xx, never a RecursionError
        for body in (f'{{"rows": [{list_900}]}}', f'{{"rows": [{deep_line}]}}'):
            for url in ("/v1/jobs", "/v1/rewrite"):
                resp = await client.post(url, content=body, headers={"content-type": "application/json"})
                assert resp.status_code == 422, (url, resp.text[:300])
        # within the limits, a nested row is fine
        shallow = {"question": "What is 2+2?", "answer": "4", "source": {"tags": [["arithmetic"]]}}
        resp = await client.post("/v1/jobs", json={"rows": [shallow], "params": FAST_PARAMS})
        assert resp.status_code == 201, resp.text


async def test_server_side_files_are_bounded_and_errors_never_show_server_paths(
    service_config: ConfigFactory, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "big.jsonl").write_bytes(jsonl(arithmetic_rows(20)))
    (root / "bad.json").write_text("{oops")
    (root / "bad.parquet").write_text("not parquet")
    cfg = service_config(allowed_root=root, limits={"path_bytes": 200})
    async with running_service(cfg) as (client, _):
        resp = await client.post("/v1/jobs", json={"path": "big.jsonl", "params": FAST_PARAMS})
        assert resp.status_code == 413 and "limits.path_bytes" in resp.text, resp.text
        for path in ("bad.json", "bad.parquet", "x" * 5000, "sub/" + "y" * 300 + ".jsonl", "nope.jsonl"):
            resp = await client.post("/v1/jobs", json={"path": path, "params": FAST_PARAMS})
            assert resp.status_code == 422, (path[:40], resp.text[:300])
            assert str(tmp_path) not in resp.text, resp.text[:300]
            assert len(resp.text) < 1000  # a 5,000-character path is not echoed whole


async def test_a_big_upload_is_parsed_off_the_event_loop(service_config: ConfigFactory) -> None:
    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(BIG_UPLOAD_ROWS)]
    data = jsonl(rows)
    gaps: list[float] = []
    # big chunks: storing the job is one Redis pipeline, whose commands are packed on the event loop
    # gc_freeze as in production: the test process's heap (every earlier test's imports and leftovers)
    # would otherwise make each full collection a stall of up to half a second
    cfg = service_config(max_upload_bytes=len(data) + 10_000, chunk_size=1000, gc_freeze=True)
    async with running_service(cfg) as (client, _):
        started = time.monotonic()
        upload = asyncio.create_task(
            client.post("/v1/jobs", files={"file": ("big.jsonl", data)}, data={"spec": '{"params": {"k": 1}}'})
        )
        last = time.monotonic()
        while not upload.done():
            resp = await client.get("/healthz")
            assert resp.status_code == 200
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            await asyncio.sleep(0.02)
        resp = await upload
        took = time.monotonic() - started
        assert resp.status_code == 201, resp.text
        assert resp.json()["problems"] == BIG_UPLOAD_ROWS
        await client.post(f"/v1/jobs/{resp.json()['id']}/cancel")
    # Parsed on the event loop, one probe would wait for (nearly) the whole upload; off it, every probe is
    # answered within a small share of it (a ratio, so a busy machine that slows both does not matter).
    assert len(gaps) > 20, gaps
    assert max(gaps) < 0.25 * took, f"/healthz waited {max(gaps):.2f}s during a {took:.2f}s upload"


# ---------------------------------------------------------------------------------- auth before the body


async def test_unauthenticated_requests_are_401_before_the_body_is_read(service_config: ConfigFactory) -> None:
    cfg = service_config(api_keys=USER_KEY, admin_keys=ADMIN_KEY)
    routes = ("/v1/jobs", "/v1/rewrite", "/v1/policy/reload")
    async with running_service(cfg) as (client, _):
        for url in routes:
            resp = await client.post(url, content=b"{not json", headers={"content-type": "application/json"})
            assert resp.status_code == 401, (url, resp.status_code, resp.text)
            pulled: list[int] = []

            async def body(pulled: list[int] = pulled) -> AsyncIterator[bytes]:
                for part in range(3):
                    pulled.append(part)
                    yield b'{"rows": []}' if part == 0 else b" "

            resp = await client.post(url, content=body(), headers={"content-type": "application/json"})
            assert resp.status_code == 401 and pulled == [], (url, pulled)
        # the same malformed body with a key is read, and gets its 422
        resp = await client.post(
            "/v1/rewrite", content=b"{not json", headers={"content-type": "application/json"} | USER
        )
        assert resp.status_code == 422


# ------------------------------------------------------------------------------------- policy reload


async def test_admin_reload_refuses_unusable_paths_and_versions_past_63_bits(
    service_config: ConfigFactory, tmp_path: Path
) -> None:
    huge_name = tmp_path / f"v{2**64}"
    huge_name.mkdir()
    (huge_name / "READY").touch()
    async with running_service(service_config(admin_keys=ADMIN_KEY)) as (client, _):
        for body in (
            {"path": "/x" * 2500},
            {"path": "a\x00b"},
            {"path": str(tmp_path), "version": 2**63},
            {"path": str(tmp_path), "version": -1},
            {"path": str(huge_name)},
        ):
            resp = await client.post("/v1/policy/reload", json=body, headers=ADMIN)
            assert resp.status_code == 422, (str(body)[:60], resp.text[:300])
            assert len(resp.text) < 1000
        assert (await client.get("/v1/policy", headers=ADMIN)).json()["version"] == 0


# ------------------------------------------------------------------------- content types, echoes, docs


async def test_content_types_and_unknown_ids_get_short_clear_errors(service_config: ConfigFactory) -> None:
    async with running_service(service_config()) as (client, _):
        for url in ("/v1/rewrite", "/v1/jobs", "/v1/policy/reload"):
            resp = await client.post(url, content=b"What is 1+1?", headers={"content-type": "text/plain"})
            assert resp.status_code == 415, (url, resp.status_code, resp.text)
        long_id = "a" * 10_000
        for method, url in (("GET", long_id), ("GET", f"{long_id}/results"), ("POST", f"{long_id}/cancel")):
            resp = await client.request(method, f"/v1/jobs/{url}")
            assert resp.status_code == 404
            assert len(resp.text) < 300 and "10000 characters" in resp.text, resp.text[:300]


def test_the_openapi_document_declares_bearer_auth_and_the_error_responses(service_config: ConfigFactory) -> None:
    from services.app import create_app

    doc = create_app(service_config(api_keys=USER_KEY)).openapi()
    [(name, scheme)] = doc["components"]["securitySchemes"].items()
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    expected = {
        ("post", "/v1/jobs"): {"401", "403", "413", "415", "422", "503"},
        ("get", "/v1/jobs/{job_id}"): {"401", "404", "503"},
        ("get", "/v1/jobs/{job_id}/results"): {"401", "404", "503"},
        ("post", "/v1/jobs/{job_id}/cancel"): {"401", "404", "409", "503"},
        ("post", "/v1/rewrite"): {"401", "413", "415", "422", "503"},
        ("post", "/v1/policy/reload"): {"401", "403", "415", "422", "503"},
        ("get", "/v1/policy"): {"401", "503"},
    }
    for (method, path), codes in expected.items():
        operation = doc["paths"][path][method]
        assert {name: []} in operation["security"], (method, path)
        assert codes <= operation["responses"].keys(), (method, path, sorted(operation["responses"]))
        parameters = {p["name"].lower() for p in operation.get("parameters", [])}
        assert "authorization" not in parameters  # not an optional header: the security scheme
    for method, path in (("post", "/v1/rewrite"), ("post", "/v1/policy/reload")):
        body = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert "rows" in body["properties"] or "path" in body["properties"]  # the body is still documented


async def test_the_docs_pages_load_with_every_asset_served_by_the_service(service_config: ConfigFactory) -> None:
    async with running_service(service_config(api_keys=USER_KEY)) as (client, _):
        for page, wanted in (("/docs", "SwaggerUIBundle"), ("/redoc", "<redoc")):
            resp = await client.get(page)
            assert resp.status_code == 200 and wanted in resp.text, resp.text
            urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", resp.text)
            assert urls, resp.text
            for url in urls:
                assert not re.match(r"(https?:)?//", url), f"{page} loads {url} from another host"
                asset = await client.get(url)
                assert asset.status_code == 200 and asset.content, (page, url)
        bundle = await client.get("/static-offline-docs/swagger-ui-bundle.js")
        assert len(bundle.content) > 100_000  # the real Swagger UI, not a placeholder


# ------------------------------------------------------------------------------------------ the client


def test_the_client_escapes_job_ids_and_refuses_keys_it_cannot_send() -> None:
    from services.client import MindgapClient, ServiceError

    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.raw_path.decode())
        return httpx.Response(404, json={"detail": "unknown job"})

    with MindgapClient("http://mindgap.test", transport=httpx.MockTransport(answer)) as client:
        for call in (client.status, client.cancel, client.results_parquet, lambda i: list(client.results(i))):
            with pytest.raises(ServiceError):
                call("abc?x=1/../d#e")
    assert asked == [
        "/v1/jobs/abc%3Fx%3D1%2F..%2Fd%23e",
        "/v1/jobs/abc%3Fx%3D1%2F..%2Fd%23e/cancel",
        "/v1/jobs/abc%3Fx%3D1%2F..%2Fd%23e/results?format=parquet",
        "/v1/jobs/abc%3Fx%3D1%2F..%2Fd%23e/results",
    ]
    for key, what in (("clé", "non-ASCII"), ("key\nmore", "line break"), ("two words", "space"), ("k\x07", "control")):
        with pytest.raises(ValueError, match=what) as caught:
            MindgapClient("http://mindgap.test", key)
        assert key not in str(caught.value)  # the message never repeats the key


def test_the_services_tests_start_run_under_a_memory_cap(serve_process: Callable[..., ServeProcess]) -> None:
    serve = serve_process()
    serve.start()
    assert serve.proc is not None
    limits = Path(f"/proc/{serve.proc.pid}/limits").read_text()
    [line] = [line for line in limits.splitlines() if line.startswith("Max address space")]
    assert line.split()[3:5] == [str(SERVE_MEMORY_CAP)] * 2, line
