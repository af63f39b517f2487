"""`mindgap up` orchestration: Redis, the rewrite service and the trainer as supervised child processes.

The orchestrator imports neither the service's app nor the trainer. It starts them through their CLIs, reads
their progress from Redis keys (`shared.keys`) and the service's REST API (`services.client.MindgapClient`,
the one Python client), and stops them by signal.
Each child runs in its own process group, so Ctrl-C on the terminal reaches only the orchestrator, which
then stops every child (SIGTERM to the whole group, SIGKILL after a grace period) in reverse start order.
Children write their output to `<run>/logs/<name>.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar

import httpx
import redis.asyncio as aioredis
from pydantic import Field
from redis.exceptions import RedisError

from mindgap.redis_server import RedisNotFound, RedisServer, free_port
from services.client import MindgapClient, ServiceError
from shared.config import MindgapSettings
from shared.keys import TRAINER_GROUP, Keys
from shared.streams import group_lag
from shared.wire import PolicyStatus, ReloadRecord
from trainer.publish import gap_line

log = logging.getLogger("mindgap.up")

TRAINER_RUN = "up"
UNREACHABLE_S = 60.0


class OrchestrateError(Exception):
    """A failure `mindgap up` reports in one line: a missing dependency, a dead child, a timeout."""


class ChildFailed(OrchestrateError):
    """A child process exited while the loop needed it."""

    def __init__(self, child: Child, code: int) -> None:
        super().__init__(f"{child.name} exited with status {code} (log: {child.log_path})")
        self.child = child
        self.code = code


class Interrupted(OrchestrateError):
    """Ctrl-C or SIGTERM arrived before the loop was running."""


class UpConfig(MindgapSettings):
    """The configuration of one `mindgap up` process (TOML file, MINDGAP_… env, CLI flags)."""

    data: Path = Field(description="problems to rewrite: JSONL/JSON/parquet, submitted as an online job")
    fields: dict[str, str] = Field(default_factory=dict, description="field mapping: canonical → source column")
    params: dict[str, Any] = Field(default_factory=dict, description="stage parameters of the job (StageParams)")
    model: str = Field("default", description="HF id, local path or 'default': served and trained")
    backend: Literal["vllm", "fake"] = Field("vllm", description="service inference engine (fake: tests)")
    nproc: int = Field(1, ge=1, description="trainer ranks (torchrun when > 1)")
    loss: Literal["sft", "dft", "is"] = Field("dft", description="trainer loss")
    checkpoint_every: int = Field(10, ge=1, description="trainer steps between published policy versions")
    max_versions: int | None = Field(None, ge=1, description="stop after this many new versions were loaded")
    epochs: int | None = Field(None, ge=1, description="passes of the online job over DATA (None: until stopped)")
    max_lag: int = Field(
        64, ge=0, description="service pauses while the trainer lags more examples (keeps data near the policy)"
    )
    redis_url: str | None = Field(None, description="env MINDGAP_REDIS_URL; None starts a local redis-server")
    key_prefix: str = Field("mindgap", min_length=1, description="prefix of every Redis key")
    host: str = Field("127.0.0.1", description="service bind address")
    port: int = Field(0, ge=0, le=65535, description="service port (0: a free one)")
    run_dir: Path | None = Field(None, description="logs, Redis data, checkpoints (default out/up-<time>)")
    service_config: Path | None = Field(None, description="TOML passed to `mindgap serve --config`")
    train_config: Path | None = Field(None, description="TOML passed to `mindgap train --config`")
    ready_timeout_s: float = Field(900.0, gt=0, description="wait this long for Redis and the service")
    grace_s: float = Field(30.0, gt=0, description="SIGTERM → SIGKILL grace per child when stopping")
    poll_s: float = Field(1.0, gt=0, description="status refresh interval")
    verbose: bool = Field(False, description="the children log at DEBUG, the libraries' logs included (-v)")


@dataclass
class ChildSpec:
    """How to start one child: its name (also its log file's), argv, and env added to ours."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


class Child:
    """A running child process, leader of its own process group, output in `<log_dir>/<name>.log`."""

    def __init__(self, spec: ChildSpec, log_dir: Path) -> None:
        self.name = spec.name
        self.log_path = log_dir / f"{spec.name}.log"
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **spec.env},
                start_new_session=True,
            )
        log.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(spec.argv))

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of the child's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def group_alive(self) -> bool:
        """Whether any process of the child's group is still there (the leader may be gone already)."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace_s: float) -> int:
        """SIGTERM the whole group, SIGKILL what is left after `grace_s`; return the leader's exit status."""
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            # the leader can exit first while workers it launched (torchrun ranks) are still stopping
            if self.proc.poll() is not None and not self.group_alive():
                break
            time.sleep(0.05)
        else:
            log.warning("%s did not stop within %.0fs: sending SIGKILL", self.name, grace_s)
            self._signal_group(signal.SIGKILL)
        return self.proc.wait()


class Supervisor:
    """Starts children, notices when one dies, and stops them all in reverse order (also on errors)."""

    def __init__(self, log_dir: Path, grace_s: float = 30.0) -> None:
        self.log_dir = log_dir
        self.grace_s = grace_s
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, spec: ChildSpec) -> Child:
        """Start `spec` as a supervised child."""
        child = Child(spec, self.log_dir)
        self.children.append(child)
        return child

    def check(self) -> None:
        """Raise ChildFailed for the first child that has exited."""
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise ChildFailed(child, code)

    def stop(self) -> dict[str, int]:
        """Stop every child, last started first; return their exit statuses by name."""
        codes: dict[str, int] = {}
        for child in reversed(self.children):
            if child.proc.poll() is None or child.group_alive():
                log.info("stopping %s", child.name)
            codes[child.name] = child.stop(self.grace_s)
        self.children.clear()
        return codes

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def redis_spec(run_dir: Path) -> tuple[ChildSpec, str]:
    """A local redis-server on a free loopback port with AOF data in `<run>/redis`, and its URL.

    Its log goes to stdout, which the supervisor writes to `<run>/logs/redis.log`.
    """
    server = RedisServer(run_dir / "redis", aof=True, log_file=False)
    try:
        argv = server.argv()
    except RedisNotFound as exc:
        raise OrchestrateError(f"{exc}, or point MINDGAP_REDIS_URL at a running one") from None
    return ChildSpec("redis", argv), server.url


def _cli(*args: str) -> list[str]:
    # the same interpreter and package as this process, whatever is on PATH
    return [sys.executable, "-m", "mindgap", *args]


def service_spec(cfg: UpConfig, port: int) -> ChildSpec:
    """`mindgap serve` for this loop (Redis URL, prefix and keys come through env from `run_up`)."""
    argv = _cli("serve", "--host", cfg.host, "--port", str(port), "--model", cfg.model, "--backend", cfg.backend)
    if cfg.service_config is not None:
        argv += ["--config", str(cfg.service_config)]
    return ChildSpec("service", argv + ["-v"] * cfg.verbose)


def trainer_spec(cfg: UpConfig, checkpoint_dir: Path) -> ChildSpec:
    """`mindgap train --source redis` for this loop, publishing its progress under run name TRAINER_RUN."""
    argv = _cli("train", "--source", "redis", "--model", cfg.model, "--nproc", str(cfg.nproc))
    argv += ["--loss", cfg.loss, "--checkpoint-dir", str(checkpoint_dir)]
    argv += ["--checkpoint-every", str(cfg.checkpoint_every), "--run-name", TRAINER_RUN]
    if cfg.train_config is not None:
        argv += ["--config", str(cfg.train_config)]
    return ChildSpec("trainer", argv + ["-v"] * cfg.verbose)


P = ParamSpec("P")
T = TypeVar("T")


async def _call(doing: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """A blocking `MindgapClient` call off the event loop; an error status becomes an OrchestrateError.

    Connection errors stay `httpx.TransportError`, and a 503 (Redis slow or restarting: the service's status reads
    give up after `probe_timeout_s`) stays a `ServiceError`; the loop tolerates both for a while.
    """
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except ServiceError as exc:
        if exc.status == 503:
            raise
        raise OrchestrateError(f"service answered {exc.status} {doing}: {str(exc.detail)[:300]}") from None


@dataclass
class LoopStatus:
    """What the live status line shows."""

    elapsed_s: float
    served_version: int
    published_version: int | None = None
    stages: dict[str, int] = field(default_factory=dict)
    step: int | None = None
    loss: float | None = None
    gap: str = ""  # the trainer's per-stage policy gap (`trainer.publish.gap_line`)
    lag: int | None = None

    def line(self) -> str:
        """One line: policy version, stage mix, trainer step, loss and policy gap, stream lag, elapsed time."""
        minutes, seconds = divmod(int(self.elapsed_s), 60)
        parts = [f"policy v{self.served_version}"]
        if self.published_version is not None and self.published_version != self.served_version:
            parts[0] += f" (published v{self.published_version})"
        total = sum(self.stages.values())
        if total:
            mix = " ".join(f"{s} {100 * self.stages.get(s, 0) / total:.0f}%" for s in ("self", "guided", "expert"))
            parts.append(f"{total} examples: {mix}")
        else:
            parts.append("no examples yet")
        if self.step is not None:
            parts.append(f"step {self.step}" + (f" loss {self.loss:.4f}" if self.loss is not None else ""))
        if self.gap:
            parts.append(f"gap {self.gap}")
        if self.lag is not None:
            parts.append(f"lag {self.lag}")
        parts.append(f"{minutes:02d}:{seconds:02d}")
        return " · ".join(parts)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


async def read_trainer(r: aioredis.Redis, keys: Keys, run: str) -> tuple[int | None, float | None, int | None, str]:
    """The trainer's published (step, loss), the policy version announced in Redis and the gap line.

    Each stage's gap figures are those of the last step that trained records of that stage.
    """
    state = {_text(k): _text(v) for k, v in (await r.hgetall(keys.trainer_state(run))).items()}
    version = _text(await r.hget(keys.policy, "version"))
    step, loss = state.get("step"), state.get("loss")
    return (
        int(step) if step else None,
        float(loss) if loss else None,
        int(version) if version and version.isdigit() else None,  # a corrupt hash is the service's to report
        gap_line(state),
    )


@dataclass
class UpResult:
    """How a loop ended: the reason, the service's reloads after the start version, and where things are."""

    reason: Literal["max-versions", "interrupted"]
    start_version: int
    reloads: list[ReloadRecord]
    run_dir: Path
    exit_codes: dict[str, int]


def new_versions(view: PolicyStatus, start_version: int) -> list[int]:
    """Distinct versions above `start_version` that the service loaded successfully, in order."""
    seen: list[int] = []
    for r in view.history:
        if r.outcome == "loaded" and r.version > start_version and r.version not in seen:
            seen.append(r.version)
    return seen


async def _wait_until(
    probe: Callable[[], Awaitable[bool]], what: str, sup: Supervisor, stop: asyncio.Event, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        sup.check()
        if stop.is_set():
            raise Interrupted(f"interrupted while waiting for {what}")
        if await probe():
            return
        if time.monotonic() > deadline:
            raise OrchestrateError(f"{what} not ready after {timeout_s:.0f}s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


def default_run_dir() -> Path:
    """out/up-<UTC time>: one folder per loop."""
    return Path("out") / f"up-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


@dataclass
class UpPlan:
    """A loop, ready to run: the resolved config, its run folder and the two children to start."""

    cfg: UpConfig
    run_dir: Path
    service: ChildSpec
    trainer: ChildSpec
    service_url: str
    api_key: str

    @classmethod
    def from_config(cls, cfg: UpConfig) -> UpPlan:
        """Resolve the run folder, a free port and a session API key; build the children's commands."""
        run_dir = (cfg.run_dir or default_run_dir()).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        port = cfg.port or free_port()
        connect_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        return cls(
            cfg=cfg,
            run_dir=run_dir,
            service=service_spec(cfg, port),
            trainer=trainer_spec(cfg, run_dir / "checkpoints"),
            service_url=f"http://{connect_host}:{port}",
            api_key=secrets.token_urlsafe(24),
        )


async def run_up(plan: UpPlan, on_status: Callable[[LoopStatus], None] = lambda s: None) -> UpResult:
    """Run the loop until Ctrl-C/SIGTERM or `max_versions` new versions were loaded; always stop children."""
    cfg = plan.cfg
    keys = Keys(cfg.key_prefix)
    # the key lets a user reach the session's service (curl, `mindgap status`) while it runs
    fd = os.open(plan.run_dir / "api_key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file was there before with wider permissions
    with os.fdopen(fd, "w") as key_file:
        key_file.write(plan.api_key + "\n")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = MindgapClient(plan.service_url, plan.api_key, timeout=30.0)
    started = time.monotonic()
    sup = Supervisor(plan.run_dir / "logs", cfg.grace_s)
    r: aioredis.Redis | None = None
    reason: Literal["max-versions", "interrupted"] = "interrupted"
    start_version = 0
    reloads: list[ReloadRecord] = []
    try:
        redis_url = cfg.redis_url
        if redis_url is None:
            spec, redis_url = redis_spec(plan.run_dir)
            sup.start(spec)
        r = aioredis.from_url(redis_url)

        async def redis_up() -> bool:
            assert r is not None
            try:
                return bool(await r.ping())
            except (RedisError, OSError):
                return False

        await _wait_until(redis_up, f"Redis at {redis_url}", sup, stop, cfg.ready_timeout_s)
        env = {
            "MINDGAP_REDIS_URL": redis_url,
            "MINDGAP_KEY_PREFIX": cfg.key_prefix,
            "MINDGAP_API_KEYS": plan.api_key,
            "MINDGAP_ADMIN_KEYS": plan.api_key,
        }
        sup.start(
            ChildSpec("service", plan.service.argv, {**plan.service.env, **env, "MINDGAP_MAX_LAG": str(cfg.max_lag)})
        )
        sup.start(ChildSpec("trainer", plan.trainer.argv, {**plan.trainer.env, **env}))

        async def service_up() -> bool:
            return await asyncio.to_thread(client.ready)

        await _wait_until(service_up, f"service {plan.service_url}/readyz", sup, stop, cfg.ready_timeout_s)
        start_version = (await _call("reading /v1/policy", client.policy)).version
        # online: the job cycles over DATA under the newest policy until stopped, or for `epochs` passes
        created = await _call(
            "submitting the job",
            client.submit_file,
            cfg.data,
            cfg.fields,
            cfg.params,
            mode="online",
            epochs=cfg.epochs,
            name="mindgap up",
        )
        job_id = created.id
        log.info("submitted %s as online job %s; serving policy v%d", cfg.data, job_id, start_version)
        unreachable_since: float | None = None
        while not stop.is_set():
            sup.check()
            try:
                view = await _call("reading /v1/policy", client.policy)
                job = await _call("reading the job status", client.status, job_id)
                status = LoopStatus(
                    elapsed_s=time.monotonic() - started, served_version=view.version, stages=job.examples
                )
                trainer = await read_trainer(r, keys, TRAINER_RUN)
                status.step, status.loss, status.published_version, status.gap = trainer
                if await r.exists(keys.examples):
                    status.lag = await group_lag(r, keys.examples, TRAINER_GROUP)
                unreachable_since = None
            except (httpx.TransportError, ServiceError, RedisError, OSError) as exc:
                # a dying child shows up in sup.check() next round; anything else gets a grace period
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > UNREACHABLE_S:
                    raise OrchestrateError(f"service or Redis unreachable for {UNREACHABLE_S:.0f}s: {exc}") from exc
                await asyncio.sleep(0.5)
                continue
            reloads = [h for h in view.history if h.version > start_version]
            on_status(status)
            if cfg.max_versions is not None and len(new_versions(view, start_version)) >= cfg.max_versions:
                reason = "max-versions"
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), cfg.poll_s)
        # a stopped loop leaves no job behind that a later service on the same Redis would resume
        # (best effort: a job that already ended answers 409)
        with contextlib.suppress(OrchestrateError, httpx.HTTPError):
            await _call("cancelling the job", client.cancel, job_id)
    except Interrupted:
        reason = "interrupted"
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await asyncio.to_thread(client.close)
        if r is not None:
            await r.aclose()
        codes = sup.stop()
    return UpResult(reason, start_version, reloads, plan.run_dir, codes)
