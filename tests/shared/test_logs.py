"""Quiet by default: mindgap's own INFO lines, the libraries' at WARNING (their FutureWarnings hidden), all of it
with -v; the settings reach child processes through the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = ("vllm.engine.async_llm", "DeepSpeed", "torch.distributed.run", "transformers.modeling_utils", "httpx")

PROGRAM = f"""
import logging, os, subprocess, sys, warnings
from shared.logs import setup_logging
setup_logging(verbose=sys.argv[1] == "-v")
logging.getLogger("mindgap.up").info("mindgap progress")
for name in {LIBRARIES!r}:
    logging.getLogger(name).info("library info")
    logging.getLogger(name).warning("library warning")
warnings.warn("a library's future", FutureWarning)
child = "import os, warnings; print(os.environ['VLLM_LOGGING_LEVEL']); warnings.warn('child future', FutureWarning)"
subprocess.run([sys.executable, "-c", child], check=True)
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY")}
    env |= {"PYTHONPATH": str(ROOT)}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )


def test_libraries_log_warnings_only_by_default() -> None:
    proc = run("")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("mindgap progress") == 1
    assert proc.stderr.count("library warning") == len(LIBRARIES)
    assert "library info" not in proc.stderr and "FutureWarning" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "WARNING"  # what vLLM's engine process and torchrun's ranks inherit


def test_verbose_shows_everything() -> None:
    proc = run("-v")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("library info") == len(LIBRARIES)
    assert proc.stderr.count("FutureWarning") == 2  # this process's and the child's
    assert proc.stdout.strip() == "DEBUG"
