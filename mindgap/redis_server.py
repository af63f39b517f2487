"""Throwaway redis-servers on free loopback ports (never the machine's 6379): for `mindgap up`, the bench and the tests.

`RedisServer` builds one redis-server command line (`argv`: port, data folder, persistence) and, when it owns
the process itself, starts it, waits for PONG, stops, restarts, freezes (SIGSTOP) and thaws it. `mindgap up`
uses only the command line: its supervisor runs the process beside the service and the trainer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

Fsync = Literal["always", "everysec", "no"]


class RedisNotFound(RuntimeError):
    """redis-server is not on PATH."""


class NotListening(RuntimeError):
    """A process never accepted connections on its port (or exited before it did)."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts connections on 127.0.0.1:`port`; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise NotListening(f"process exited with {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise NotListening(f"nothing listened on port {port} within {timeout_s:.0f}s")


def redis_server_exe() -> str:
    """The redis-server executable on PATH; RedisNotFound when there is none."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RedisNotFound("redis-server not found on PATH: install Redis 7 (e.g. apt-get install redis-server)")
    return exe


class RedisServer:
    """One redis-server on 127.0.0.1:`port` (a free one by default) with its data in `workdir`.

    `aof`: append-only file in `workdir` (data survive a restart; `fsync` says how often it is flushed);
    without it nothing is persisted. `log_file`: the server's log in `workdir/redis.log` instead of stdout.
    Used as a context manager, it is started on entry and stopped on exit.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        aof: bool = False,
        fsync: Fsync = "everysec",
        log_file: bool = True,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.aof = aof
        self.fsync = fsync
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of the server (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        """The redis-server command line (RedisNotFound without one on PATH); creates `workdir`."""
        exe = redis_server_exe()
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir.resolve())]
        argv += ["--save", "", "--appendonly", "yes" if self.aof else "no"]
        if self.aof:
            argv += ["--appendfsync", self.fsync]
        if self.log_file:
            argv += ["--logfile", str(self.workdir.resolve() / "redis.log")]
        return argv

    @property
    def running(self) -> bool:
        """Whether the server process this object started is still there."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING (an AOF is loaded by then)."""
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NotListening(f"redis-server exited with {self.proc.returncode} (log in {self.workdir})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise NotListening(f"redis-server did not answer PING on port {self.port} within {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server (thawed first: a frozen one would not act on it); SIGKILL after `timeout_s`."""
        if self.running:
            assert self.proc is not None
            self.thaw()
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port (with AOF, the data survive)."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP the server: connections stay open and every call hangs until `thaw`."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT a frozen server (harmless on a running one)."""
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
