"""Service line: a rewrite workload through REST jobs against the same sampling in a plain `LLM.generate` loop.

The service runs as `mindgap`'s FastAPI app with the real vLLM engine in a child process, on a tiny
random model: the line measures what the service adds (HTTP, Redis task chunks, the worker loop, grading,
publishing; scoring is off, as for online jobs by default), which a small model makes visible instead of
hiding it behind model compute. Every response runs to `max_tokens` and nothing is solved, so each
problem takes `k` self samples and `resolve_attempts` guided samples, one round each; the baseline
sends exactly those requests to `vllm.LLM.generate` in two batched calls. The figure is generated
tokens per second of wall time. Peak RSS of both process trees feeds the memory line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from mindgap.bench.context import BenchContext
from mindgap.bench.procs import PeakRSS, WorkerError, kill_group, kill_tree, log_tail, run_worker
from mindgap.bench.report import LineResult
from mindgap.bench.timings import Row, rate_stat, summarize
from mindgap.redis_server import RedisServer, free_port
from shared.config import StageParams
from shared.dataio import read_problems

TARGET = 0.95
MODEL = "tiny random Llama (2 layers, hidden 256)"
START_TIMEOUT_S = 600
POLL_S = 0.25


def engine_options(model_dir: Path) -> dict[str, Any]:
    """vLLM options both sides use."""
    return {"model": str(model_dir), "dtype": "float32", "max_model_len": 1024, "kv_cache_gib": 1, "seed": 0}


def run_job(
    client: httpx.Client, rows: list[dict[str, Any]], params: dict[str, Any]
) -> tuple[int, float, dict[str, Any]]:
    """Submit one job and poll it to completion; (generated tokens, wall seconds, final status).

    The wall time runs from sending the job to the service's own `finished_at` (same machine, same
    clock), so the poll interval neither adds to it nor, polled often, takes CPU from the engine.
    """
    start = time.time()
    created = client.post("/v1/jobs", json={"rows": rows, "params": params})
    created.raise_for_status()
    job_id = created.json()["id"]
    while True:
        status: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if status["state"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(POLL_S)
    seconds = float(status["finished_at"]) - start
    if status["state"] != "completed":
        raise RuntimeError(f"bench job {job_id} ended {status['state']}: {status.get('error')}")
    return int(status["generated_tokens"]), seconds, status


def run(ctx: BenchContext, parts: frozenset[str] = frozenset({"service"})) -> LineResult:
    """Measure the service line and the service half of the memory line."""
    from mindgap.bench.tiny_model import random_model
    from shared.model_source import resolve_model

    work = ctx.scratch("service")
    n_problems = 16 if ctx.quick else 32
    params = StageParams(k=4, resolve_attempts=2, rounds=1, max_tokens=64 if ctx.quick else 128)
    problems = read_problems(ctx.gsm8k, limit=n_problems).problems
    rows = [p.model_dump(exclude={"meta"}) for p in problems]
    job_params = params.model_dump(mode="json")
    model_dir = random_model(work / "tiny-random", Path(resolve_model("default")))
    engine = engine_options(model_dir)

    tokens: list[int] = []
    seconds: list[float] = []
    with RedisServer(work / "redis") as redis_server:
        port = free_port()
        spec = {
            "host": "127.0.0.1",
            "port": port,
            "backend": "vllm",
            "engine": engine,
            "redis_url": redis_server.url,
            "key_prefix": "bench",
            "stages": job_params,
            "max_lag": 0,  # no trainer reads the examples stream here
            "policy_poll_s": 3600,
        }
        spec_path = work / "serve.json"
        spec_path.write_text(json.dumps(spec))
        log_path = work / "serve.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mindgap.bench.engine_worker", "serve", str(spec_path), "-"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                with (
                    PeakRSS(proc.pid) as service_rss,
                    httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client,
                ):
                    _wait_ready(client, proc, log_path)
                    run_job(client, rows, job_params)  # warm-up
                    for _ in range(ctx.repeat):
                        n, s, status = run_job(client, rows, job_params)
                        tokens.append(n)
                        seconds.append(s)
            finally:
                kill_tree(proc)
                kill_group(proc.pid)
    base, base_rss = run_worker(
        ["mindgap.bench.engine_worker", "generate", str(_write_spec(work, engine, rows, params, ctx.repeat)),
         str(work / "generate.result.json")],
        work / "generate.result.json",
        work / "generate.log",
        timeout_s=1800,
    )  # fmt: skip
    solved = status["stages"].get("self", 0) + status["stages"].get("guided", 0)
    throughput = Row(
        line="service",
        metric="generated tokens/s, rewrite job over REST",
        unit="tokens/s",
        model=MODEL,
        mindgap=rate_stat(tokens, seconds),
        baseline=rate_stat(base["tokens"], base["seconds"]),
        baseline_name="vLLM LLM.generate, same requests",
        target=TARGET,
        note=(
            f"{n_problems} problems × ({params.k} self + {params.resolve_attempts} guided) samples of"
            f" {params.max_tokens} tokens per job, one round per stage, scoring off (the online default);"
            f" the service also stores the job, grades every sample and publishes each problem's expert"
            f" example (the baseline only samples); {solved} problems solved. Job time runs from the POST"
            " to the job's own finished_at."
        ),
        extra={"job_tokens": tokens, "job_seconds": seconds, "baseline_tokens": base["tokens"]},
    )
    memory = Row(
        line="memory",
        metric="peak RSS, service process tree",
        unit="GiB",
        model=MODEL,
        mindgap=summarize([service_rss.peak_gib]),
        baseline=summarize([base_rss]),
        baseline_name="vLLM LLM.generate process tree",
        higher_is_better=False,
        note="one sample each over the whole process life (engine start included), KV cache 1 GiB both sides.",
    )
    return LineResult(
        name="service",
        rows=[throughput, memory],
        info={"problems": n_problems, "params": job_params, "engine": engine, "baseline_create_s": base["create_s"]},
    )


def _write_spec(
    work: Path, engine: dict[str, Any], rows: list[dict[str, Any]], params: StageParams, repeat: int
) -> Path:
    path = work / "generate.json"
    path.write_text(
        json.dumps({**engine, "problems": rows, "params": params.model_dump(mode="json"), "repeat": repeat})
    )
    return path


def _wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WorkerError(f"the service exited with {proc.returncode} while starting:\n{log_tail(log_path)}")
        try:
            if client.get("/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise WorkerError(f"the service was not ready within {START_TIMEOUT_S} s:\n{log_tail(log_path)}")
