"""Child processes of the bench: run one with its peak memory sampled, stop it with all it started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil


class PeakRSS:
    """Samples the resident memory of a process and all its descendants until stopped; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"peak-rss-{pid}", daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss(root))
            self._stop.wait(self.interval_s)

    @property
    def peak_gib(self) -> float:
        """The peak in GiB."""
        return self.peak_bytes / 2**30


def tree_rss(root: psutil.Process) -> int:
    """Resident bytes of `root` plus every live descendant (0 once it has exited)."""
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


class WorkerError(RuntimeError):
    """A bench worker process failed; the message carries the tail of its log."""


def run_worker(
    args: Sequence[str],
    result_path: Path,
    log_path: Path,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    python_module: bool = True,
    after: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], float]:
    """Run a worker (`python -m args…` by default) to completion; return its JSON result and peak RSS in GiB.

    The worker writes its result to `result_path`; its stdout/stderr go to `log_path`, whose tail is quoted
    when it fails. Its exit status is not trusted alone: vLLM processes may abort in teardown after writing.
    `after`, when given, runs once the process has exited and turns its outputs into `result_path`.
    """
    cmd = [sys.executable, "-m", *args] if python_module else list(args)
    what = " ".join(args[:4]) if python_module else " ".join(args[1:5])
    full_env = {**os.environ, **(env or {})}
    result_path.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        with PeakRSS(proc.pid) as peak:
            try:
                rc = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                raise WorkerError(f"{what} timed out after {timeout_s:.0f}s; log {log_path}") from None
            finally:
                kill_group(proc.pid)
    if after is not None and rc == 0:
        after()
    if not result_path.is_file():
        raise WorkerError(f"{what} exited {rc} without a result:\n{log_tail(log_path)}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result, peak.peak_gib


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Terminate `proc` and its descendants (SIGTERM, then SIGKILL after 10 s)."""
    try:
        parent = psutil.Process(proc.pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    proc.wait()


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of the process group a worker led (engine processes its exit orphaned)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def log_tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log file (empty when missing)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
