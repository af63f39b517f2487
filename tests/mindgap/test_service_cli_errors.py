"""The service client commands (`status`, `results`) fail with one `error:` line, never a traceback: a key that
cannot be sent is the user's to fix (not blamed on the service), and so is an `-o` that cannot be written."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from mindgap.cli import _register, app
from services.client import MindgapClient
from shared.config import StageParams
from shared.wire import JobStatus

JOB = "0123456789abcdef"


def invoke(*args: str) -> tuple[int, str]:
    _register()
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


@pytest.mark.parametrize(("key", "what"), [("clé", "non-ASCII character"), ("k1\nk2", "line break")])
def test_a_key_that_cannot_be_sent_is_one_error_line_naming_the_key(key: str, what: str) -> None:
    code, output = invoke("status", JOB, "--api-key", key, "--url", "http://127.0.0.1:9")
    line = one_error_line(output)
    assert code == 2 and line.startswith("error: --api-key: bad API key") and what in line
    assert "cannot reach" not in line and key not in output


def _finished_job() -> JobStatus:
    return JobStatus(
        id=JOB, state="completed", mode="once", epochs=1, epoch=0, created_at=0.0, problems=1, rows_rejected=0,
        chunks=1, chunks_done=1, chunks_failed=0, problems_done=1, progress=1.0, stages={}, dropped=0,
        ungradable=0, examples={}, examples_total=0, generated_tokens=0, policy_versions=[0], errors=[],
        params=StageParams(), fields={},
    )  # fmt: skip


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_an_unwritable_output_is_one_error_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, suffix: str) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/results"):
            return httpx.Response(200, content=b"PAR1")
        return httpx.Response(200, content=_finished_job().model_dump_json())

    monkeypatch.setattr(
        "mindgap.cli.service._client",
        lambda url, key: MindgapClient(url, key, transport=httpx.MockTransport(answer)),
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    output_path = blocker / f"x{suffix}"  # under a regular file: no one, root included, can write it
    code, output = invoke("results", JOB, "-o", str(output_path))
    line = one_error_line(output)
    assert code == 2 and line.startswith(f"error: -o: cannot write {output_path}"), line
