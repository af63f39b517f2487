"""`mindgap status` says why a running job makes no progress (backpressure: the trainer lags)."""

from __future__ import annotations

import httpx
import pytest
from typer.testing import CliRunner

from mindgap.cli import _register, app
from services.client import MindgapClient
from shared.config import StageParams
from shared.wire import JobStatus

JOB = "0123456789abcdef"


def held_back_job() -> JobStatus:
    return JobStatus(
        id=JOB, state="running", mode="once", epochs=1, epoch=0, created_at=0.0, problems=6, rows_rejected=0,
        chunks=6, chunks_done=3, chunks_failed=0, problems_done=3, progress=0.5, stages={"self": 3}, dropped=0,
        ungradable=0, examples={"self": 3}, examples_total=3, generated_tokens=30, policy_versions=[0], errors=[],
        params=StageParams(), fields={}, waiting="trainer lag 3 > max_lag 2",
    )  # fmt: skip


def test_status_shows_what_the_job_is_waiting_for(monkeypatch: pytest.MonkeyPatch) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=held_back_job().model_dump_json())

    monkeypatch.setattr(
        "mindgap.cli.service._client",
        lambda url, key: MindgapClient(url, key, transport=httpx.MockTransport(answer)),
    )
    _register()
    result = CliRunner().invoke(app, ["status", JOB])
    assert result.exit_code == 0, result.output
    assert "waiting: trainer lag 3 > max_lag 2" in result.output
