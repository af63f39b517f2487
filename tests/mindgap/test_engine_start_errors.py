"""An engine that cannot start ends `mindgap rewrite` and `mindgap serve` with one `error:` line, no traceback.

The real checks ask vLLM on CPU for a KV cache far over the free memory: the size check before vLLM starts
refuses it (vLLM itself would have printed its own traceback from the engine process, then the CLI's). The
serve check in process shows how: uvicorn's startup traceback is replaced by the error's one line.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mindgap.redis_server import free_port
from services.engine import EngineStartError
from services.settings import ServiceConfig

ROOT = Path(__file__).resolve().parents[2]
TOO_BIG = {"MINDGAP_ENGINE__KV_CACHE_GIB": "100000"}


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import torch

    if torch.cuda.is_available():
        pytest.skip("the KV cache size check is for vLLM on CPU")
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MINDGAP_", "VLLM_CPU_KVCACHE"))} | env
    cmd = [sys.executable, "-m", "mindgap", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=ROOT, timeout=300)


def assert_one_error_line(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode != 0, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "needs 100000 GiB (engine.kv_cache_gib)" in errors[0] and "GiB of memory is free" in errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.redis
def test_serve_turns_an_engine_start_error_into_one_line(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from mindgap.cli.service import _serve

    async def cannot_start(*_: object) -> None:
        raise EngineStartError("the vLLM KV cache needs 9 GiB (engine.kv_cache_gib) but only 2.0 GiB is free")

    monkeypatch.setattr("services.app.create_engine", cannot_start)
    cfg = ServiceConfig(redis_url=redis_url, key_prefix=key_prefix, port=free_port())
    with caplog.at_level(logging.INFO):
        assert _serve(cfg) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: the vLLM KV cache needs 9 GiB (engine.kv_cache_gib) but only 2.0 GiB is free"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Traceback" not in logged and "Application startup failed" in logged


@pytest.mark.vllm
@pytest.mark.slow
def test_rewrite_says_why_the_engine_cannot_start(default_model_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(
        *("rewrite", str(ROOT / "examples" / "sample.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--limit", "1"),
        *("--model", str(default_model_dir)),
        env=TOO_BIG,
    )
    assert_one_error_line(proc)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.redis
@pytest.mark.vllm
@pytest.mark.slow
def test_serve_says_why_the_engine_cannot_start(default_model_dir: Path, redis_url: str, key_prefix: str) -> None:
    env = TOO_BIG | {"MINDGAP_REDIS_URL": redis_url, "MINDGAP_KEY_PREFIX": key_prefix}
    proc = run_cli("serve", "--port", str(free_port()), "--model", str(default_model_dir), env=env)
    assert_one_error_line(proc)
