"""Service fixtures: in-process apps on the fake engine (httpx ASGI transport) and `mindgap serve` subprocesses."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from mindgap.redis_server import free_port
from services.settings import ServiceConfig

if TYPE_CHECKING:  # the app (FastAPI, the pipeline, grading) is imported only by the tests that run one
    from fastapi import FastAPI

    from services.app import EngineFactory

REPO = Path(__file__).resolve().parents[2]


def arithmetic_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    """`n` problems the fake engine understands ("What is a+b?"), a mix of self and guided outcomes."""
    return [{"question": f"What is {i}+{i + 2}?", "answer": str(2 * i + 2)} for i in range(start, start + n)]


FAST_PARAMS = {"k": 2, "resolve_attempts": 2, "max_tokens": 200}
# Address-space cap of every `mindgap serve` the tests start (a fake-engine service peaks near 0.4 GB): a request
# that makes it balloon fails that test with a MemoryError instead of taking the machine down.
SERVE_MEMORY_CAP = 4 * 1024**3


@pytest.fixture
def service_config(redis_url: str, key_prefix: str) -> Callable[..., ServiceConfig]:
    """A factory of fake-engine ServiceConfigs on the test's Redis and key prefix."""

    def make(**overrides: Any) -> ServiceConfig:
        base: dict[str, Any] = {
            "backend": "fake",
            "redis_url": redis_url,
            "key_prefix": key_prefix,
            "claim_idle_ms": 1000,
            "policy_poll_s": 0.2,
            "chunk_size": 2,
            # a full collection of the test process's heap at every app start would add minutes to the suite
            "gc_freeze": False,
        }
        return ServiceConfig(**(base | overrides))

    return make


@asynccontextmanager
async def running_service(
    cfg: ServiceConfig, engine_factory: EngineFactory | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The app with its lifespan running, and an httpx client talking to it in process."""
    from services.app import create_app, default_engine

    app = create_app(cfg, engine_factory or default_engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
            yield client, app


async def wait_for_job(
    client: httpx.AsyncClient, job_id: str, states: tuple[str, ...] = ("completed",), timeout: float = 60.0
) -> dict[str, Any]:
    """Poll a job until its state is in `states`; fail on another finished state or the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if status["state"] in states:
            return status
        assert status["state"] in ("queued", "running"), status
        assert time.monotonic() < deadline, f"job {job_id} still {status['state']}: {status}"
        await asyncio.sleep(0.1)


@dataclass
class ServeProcess:
    """A `mindgap serve --backend fake` subprocess on a free port; killable."""

    env: dict[str, str]
    args: list[str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    memory_cap: int = SERVE_MEMORY_CAP

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        argv = [sys.executable, "-m", "mindgap", "serve", "--backend", "fake", "--port", str(self.port), *self.args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._cap_memory
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"serve not ready after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def _cap_memory(self) -> None:
        """Runs in the child before exec: the cap applies to the service and every process it starts."""
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_cap, self.memory_cap))

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig` and wait for the process to exit; its exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def serve_process(redis_url: str, key_prefix: str, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """A factory of `mindgap serve --backend fake` subprocesses sharing the test's Redis and prefix."""
    started: list[ServeProcess] = []

    def make(*args: str, **env: str) -> ServeProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MINDGAP_")}
        full_env |= {"MINDGAP_REDIS_URL": redis_url, "MINDGAP_KEY_PREFIX": key_prefix, "PYTHONUNBUFFERED": "1"}
        full_env |= env
        proc = ServeProcess(full_env, list(args), tmp_path / f"serve-{len(started)}.log")
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()
