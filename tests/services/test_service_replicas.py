"""`mindgap serve` processes: two replicas share one job, SIGTERM drains gracefully, and the CLI client
commands (`submit --wait`, `status`, `results`) work against a live server."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from services.client import MindgapClient, ServiceError
from shared.keys import REWRITER_GROUP, Keys
from tests.support.chaos_jobs import check_job, submit, wait_chunks
from tests.support.service import REPO, ServeProcess, arithmetic_rows

pytestmark = [pytest.mark.redis, pytest.mark.slow]

REPLICA_ENV = {
    "MINDGAP_CLAIM_IDLE_MS": "1500",
    "MINDGAP_CHUNK_SIZE": "2",
    "MINDGAP_MAX_INFLIGHT_CHUNKS": "2",
    "MINDGAP_FAKE_DELAY_S": "0.15",
}


def committed_chunks(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r'^mindgap_chunks_total\{outcome="committed"\} (\S+)', text, re.M)
    finished = re.search(r'^mindgap_chunks_total\{outcome="job_finished"\} (\S+)', text, re.M)
    return sum(float(m.group(1)) for m in (match, finished) if m)


@pytest.mark.chaos
def test_two_replicas_finish_one_job_together_each_problem_once(
    serve_process: Callable[..., ServeProcess], redis_url: str, key_prefix: str
) -> None:
    first, second = serve_process(**REPLICA_ENV), serve_process(**REPLICA_ENV)
    first.start()
    second.start()
    with httpx.Client(base_url=first.url, timeout=10) as http:
        job = submit(http)  # submitted to one replica; both take its chunks from the shared stream
        check_job(http, redis.Redis.from_url(redis_url), Keys(key_prefix), job)
    a, b = committed_chunks(first.url), committed_chunks(second.url)
    assert a > 0 and b > 0, (a, b)
    assert a + b == 12


@pytest.mark.chaos
def test_sigterm_finishes_running_chunks_acks_and_exits(
    serve_process: Callable[..., ServeProcess], redis_url: str, key_prefix: str
) -> None:
    first = serve_process(**REPLICA_ENV)
    first.start()
    keys = Keys(key_prefix)
    r = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=first.url, timeout=10) as http:
        job = submit(http)
        wait_chunks(http, job, 2)
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert first.kill(signal.SIGTERM) in (0, -signal.SIGTERM)
    # nothing of the stopped replica is left pending: what it started, it committed and acknowledged
    pending = r.xpending(keys.job_tasks(job), REWRITER_GROUP)
    assert pending["pending"] == 0, pending
    log = first.log_path.read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log
    second = serve_process(**REPLICA_ENV)
    second.start()
    with httpx.Client(base_url=second.url, timeout=10) as http:
        check_job(http, r, keys, job)


def test_cli_submit_wait_status_and_results(serve_process: Callable[..., ServeProcess], tmp_path: Path) -> None:
    server = serve_process(MINDGAP_API_KEYS="cli-key")
    server.start()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(3)) + "{bad\n")
    env = {"MINDGAP_URL": server.url, "MINDGAP_API_KEY": "cli-key", "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mindgap", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )

    done = cli("submit", str(data), "--k", "2", "--max-tokens", "200", "--wait")
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().splitlines()[-1]
    assert "line 4" in done.stderr  # the bad row is reported, the good ones ran
    shown = cli("status", job, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "completed"
    out = tmp_path / "out.jsonl"
    got = cli("results", job, "-o", str(out))
    assert got.returncode == 0, got.stderr
    assert sorted(json.loads(line)["problem_id"] for line in out.read_text().splitlines()) == ["1", "2", "3"]

    with MindgapClient(server.url, "cli-key") as client:  # the Python client behind the commands
        assert client.ready() and [j.id for j in client.jobs()] == [job]
        assert len(list(client.results(job))) == client.status(job).examples_total
        online = client.submit_rows(arithmetic_rows(2), params={"k": 2, "max_tokens": 200}, mode="online")
        assert client.cancel(online.id).state == "cancelled"
        with pytest.raises(ServiceError) as err:
            client.cancel(online.id)
        assert err.value.status == 409
        rewritten = client.rewrite(arithmetic_rows(1), params={"k": 2, "max_tokens": 200})
        assert rewritten.policy_version == 0 and len(rewritten.examples) == 1
        assert client.policy().version == 0
        with pytest.raises(ServiceError) as err:
            client.submit_path("data.jsonl")
        assert err.value.status == 403

    bad = cli("status", "0123456789abcdef")
    assert bad.returncode == 2 and "404" in bad.stderr and "Traceback" not in bad.stderr
    env["MINDGAP_API_KEY"] = "wrong"
    denied = cli("submit", str(data))
    assert denied.returncode == 2 and "401" in denied.stderr


def test_serve_refuses_a_public_bind_without_keys() -> None:
    env = {"PATH": "/usr/bin:/bin", "MINDGAP_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, "-m", "mindgap", "serve", "--backend", "fake", "--host", "0.0.0.0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--insecure" in done.stderr


def test_cli_submits_a_split_of_a_local_hf_datasets_folder(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    """`mindgap submit FOLDER --split S` reads the folder with the one reader and uploads that split's rows."""
    import datasets

    rows = arithmetic_rows(5)
    folder = tmp_path / "hf"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows[2:])}
    ).save_to_disk(str(folder))
    server = serve_process(MINDGAP_API_KEYS="cli-key")
    server.start()
    env = {"MINDGAP_URL": server.url, "MINDGAP_API_KEY": "cli-key", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "mindgap", "submit", str(folder), "--split", "test", "--k", "2", "--wait"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().splitlines()[-1]
    status = httpx.get(f"{server.url}/v1/jobs/{job}", headers={"Authorization": "Bearer cli-key"}).json()
    assert status["problems"] == 3, status
    missing = subprocess.run(
        [sys.executable, "-m", "mindgap", "submit", str(folder), "--split", "nope"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: FILE:"), missing.stderr
