"""The task consumer: takes job chunks from the `rewriters` group, runs the pipeline, commits, acks.

Delivery is at-least-once. A chunk read with XREADGROUP sits in this consumer's pending list until it is
committed and acknowledged; while it runs, a heartbeat re-claims it (XCLAIM JUSTID) so its idle time
stays low. A replica that dies stops the heartbeat, its chunks go idle, and after `claim_idle_ms` any
replica (a restarted one included) takes them over with XAUTOCLAIM. The commit itself is exactly-once
(see services.job_store), so a chunk that ran twice counts once. A chunk delivered more than `max_deliveries`
times is moved to the dead-letter stream with the last error seen, and counted as failed for its job.

Stopping (SIGTERM through uvicorn, or app shutdown): no new chunks are taken; running chunks finish,
commit and are acknowledged; what does not finish within the drain timeout stays pending for another
replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from services.engine import Engine
from services.job_store import Commit, JobStore, chunk_key, outcome_counters
from services.metrics import Metrics
from services.pipeline import rewrite_batch
from services.scheduler import EngineGate, RoundRobin
from services.settings import ServiceConfig
from shared.grading import Grader
from shared.keys import REWRITER_GROUP, TRAINER_GROUP, Keys
from shared.retry import DEFAULT_BACKOFF, retry_async
from shared.streams import backpressure_reason, dead_letter, field, group_lag, wait_for_capacity

log = logging.getLogger("mindgap.worker")

IDLE_POLL_S = 0.25  # how often an idle worker looks for new jobs (a local submission wakes it at once)


@dataclass(frozen=True)
class Task:
    """One task-stream entry: chunk `chunk` of epoch `epoch` of job `job_id`."""

    job_id: str
    entry_id: str
    epoch: int
    chunk: int


class Worker:
    """Consumes chunks of every active job, up to `cfg.max_inflight_chunks` at once, fairly across jobs."""

    def __init__(
        self,
        cfg: ServiceConfig,
        r: aioredis.Redis,
        store: JobStore,
        engine: Engine,
        grader: Grader,
        gate: EngineGate,
        policy_version: Callable[[], int],
        metrics: Metrics,
        consumer: str,
    ) -> None:
        self.cfg = cfg
        self.r = r
        self.keys: Keys = store.keys
        self.store = store
        self.engine = engine
        self.grader = grader
        self.gate = gate
        self.policy_version = policy_version
        self.metrics = metrics
        self.consumer = consumer
        self._rr = RoundRobin()
        self._inflight: dict[str, tuple[Task, asyncio.Task[None]]] = {}
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._last_claim = 0.0
        self._held_back: str | None = None  # the backpressure reason while new chunks are held back

    def wake(self) -> None:
        """Look for work now (a job was just submitted here)."""
        self._wake.set()

    @property
    def inflight(self) -> int:
        """Chunks running on this replica."""
        return len(self._inflight)

    async def run(self) -> None:
        """The consumer loop; returns once `stop()` was called and running chunks are drained."""
        heartbeat = asyncio.create_task(self._heartbeat())
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    started = await self._fill_slots()
                    failures = 0
                except (RedisError, OSError) as exc:  # redis-py's errors are not the builtin ConnectionError
                    log.warning("task stream unavailable (%s); retrying", exc)
                    started = 0
                    await self._pause(DEFAULT_BACKOFF.delay(failures))
                    failures += 1
                if not started:
                    await self._pause(IDLE_POLL_S)
        finally:
            await self._drain()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def stop(self) -> None:
        """Stop taking chunks (running ones finish: see `run`)."""
        self._stopping.set()
        self._wake.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep up to `seconds`, or less when woken or stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _fill_slots(self) -> int:
        """Start chunks in free slots; how many were started."""
        if not self.gate.is_open:
            return 0
        # measured even with every slot taken: running chunks wait for the same capacity before they commit
        lag = await group_lag(self.r, self.keys.examples, TRAINER_GROUP)
        self.metrics.stream_lag.set(lag)
        if self._hold_back(backpressure_reason(lag, self.cfg.max_lag)):
            return 0
        free = self.cfg.max_inflight_chunks - len(self._inflight)
        if free <= 0:
            return 0
        jobs = await self.store.active()
        if not jobs:
            return 0
        tasks: list[Task] = []
        if time.monotonic() - self._last_claim > self.cfg.claim_idle_ms / 2000:
            self._last_claim = time.monotonic()
            tasks += await self._claim_stale(jobs, free)
        if len(tasks) < free:
            tasks += await self._read_new(jobs, free - len(tasks))
        for task in tasks:
            runner = asyncio.create_task(self._process(task))
            self._inflight[task.entry_id] = (task, runner)
        self.metrics.inflight.set(len(self._inflight))
        return len(tasks)

    def _hold_back(self, reason: str | None) -> bool:
        """Record whether backpressure holds new chunks back (metric, one log line per change); whether it does."""
        if reason is not None and self._held_back is None:
            log.info("holding back new chunks: %s (the trainer reads too slowly)", reason)
        elif reason is None and self._held_back is not None:
            log.info("trainer caught up: taking chunks again")
        self._held_back = reason
        self.metrics.backpressure.set(reason is not None)
        return reason is not None

    async def _read_new(self, jobs: Sequence[str], free: int) -> list[Task]:
        """Up to `free` new chunks, at most one per job per turn, in round-robin job order."""
        order = self._rr.order(jobs)
        got: list[Task] = []
        pos = 0
        while pos < len(order) and len(got) < free:
            window = order[pos : pos + free - len(got)]
            pos += len(window)
            streams: dict[Any, Any] = {self.keys.job_tasks(j): ">" for j in window}
            try:
                reply: Any = await self.r.xreadgroup(REWRITER_GROUP, self.consumer, streams, count=1)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._retire_missing(window)
                continue
            for stream, entries in reply or []:
                job_id = self._job_of(stream)
                for entry_id, data in entries:
                    got.append(_task(job_id, entry_id, data))
                    self._rr.served(job_id)
        return got

    async def _claim_stale(self, jobs: Sequence[str], free: int) -> list[Task]:
        """Take over chunks another consumer left idle for `claim_idle_ms` (it died or hung)."""
        got: list[Task] = []
        for job_id in jobs:
            if len(got) >= free:
                break
            try:
                reply = await self.r.xautoclaim(
                    self.keys.job_tasks(job_id),
                    REWRITER_GROUP,
                    self.consumer,
                    min_idle_time=self.cfg.claim_idle_ms,
                    start_id="0-0",
                    count=free - len(got),
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._retire_missing([job_id])
                continue
            for entry_id, data in reply[1]:
                task = _task(job_id, entry_id, data) if data else None  # no data: deleted meanwhile
                # a chunk of ours can look idle when the loop was blocked; it is still running
                if task is not None and task.entry_id not in self._inflight:
                    got.append(task)
        if got:
            log.info("reclaimed %d idle chunk(s)", len(got))
        return got

    async def _retire_missing(self, jobs: Sequence[str]) -> None:
        for job_id in jobs:
            info = await self.store.info(job_id)
            if info is None or info.finished:
                await self.store.retire(job_id)

    def _job_of(self, stream: bytes | str) -> str:
        name = stream.decode() if isinstance(stream, bytes) else stream
        return name.removeprefix(self.keys.job_tasks(""))

    async def _deliveries(self, task: Task) -> int:
        pending = await self.r.xpending_range(
            self.keys.job_tasks(task.job_id), REWRITER_GROUP, min=task.entry_id, max=task.entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 1

    async def _ack(self, task: Task) -> None:
        await self.r.xack(self.keys.job_tasks(task.job_id), REWRITER_GROUP, task.entry_id)

    async def _process(self, task: Task) -> None:
        """Run one chunk: pipeline, commit, ack; on error leave it pending for a later delivery."""
        key = chunk_key(task.epoch, task.chunk)
        what = f"chunk {key} of job {task.job_id}"
        try:
            # Redis outages are waited out (every call here is idempotent) rather than counted as a failed
            # delivery: a chunk is dead-lettered for its own errors, not for the infrastructure's.
            job = await retry_async(lambda: self.store.info(task.job_id), what)
            if job is None or job.finished:
                await retry_async(lambda: self._ack(task), what)  # cancelled or expired: nothing to do
                return
            deliveries = await retry_async(lambda: self._deliveries(task), what)
            if deliveries > self.cfg.max_deliveries:
                await self._dead_letter(task, deliveries)
                return
            await retry_async(lambda: self.store.mark_running(task.job_id), what)
            problems = await retry_async(lambda: self.store.chunk_problems(job, task.chunk), what)
            salt = task.job_id if job.mode == "once" else f"{task.job_id}:e{task.epoch}"
            await retry_async(
                lambda: wait_for_capacity(self.r, self.keys.examples, TRAINER_GROUP, self.cfg.max_lag), what
            )
            # The commit happens inside the gate too: a reload waits for it, so this replica never appends
            # an older version's example to the stream after a newer one.
            async with self.gate.batch():
                version = self.policy_version()  # cannot change while the gate is held (reloads are exclusive)
                self.metrics.batch_size.observe(len(problems))
                outcomes = await rewrite_batch(problems, self.engine, self.grader, job.params, version, salt)
                examples = [(ex.id, ex.model_dump_json()) for out in outcomes for ex in out.examples]
                counters = outcome_counters(outcomes)
                commit = await retry_async(
                    lambda: self.store.commit_chunk(task.job_id, key, counters, examples, version), what
                )
            await retry_async(lambda: self._ack(task), what)
            if commit in (Commit.COMMITTED, Commit.NEXT_EPOCH, Commit.JOB_FINISHED):
                self._count(outcomes)
            self.metrics.chunks.labels(commit.name.lower()).inc()
            if commit is Commit.JOB_FINISHED:
                log.info("job %s finished", task.job_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("chunk %s of job %s failed", key, task.job_id)
            self.metrics.chunks.labels("error").inc()
            with contextlib.suppress(Exception):
                await self.store.note_chunk_error(task.job_id, task.entry_id, f"{type(exc).__name__}: {exc}")
        finally:
            self._inflight.pop(task.entry_id, None)
            self.metrics.inflight.set(len(self._inflight))
            self._wake.set()

    async def _dead_letter(self, task: Task, deliveries: int) -> None:
        reason = await self.store.chunk_error(task.job_id, task.entry_id) or "never completed (replica killed?)"
        reason = f"delivered {deliveries} times, last error: {reason}"
        payload = {"job": task.job_id, "epoch": task.epoch, "chunk": task.chunk}
        await dead_letter(self.r, self.keys, self.keys.job_tasks(task.job_id), task.entry_id, payload, reason)
        await self.store.fail_chunk(task.job_id, chunk_key(task.epoch, task.chunk), f"chunk {task.chunk}: {reason}")
        await self._ack(task)
        self.metrics.chunks.labels("dead_lettered").inc()
        log.warning("dead-lettered chunk %d of job %s: %s", task.chunk, task.job_id, reason)

    def _count(self, outcomes: Sequence[Any]) -> None:
        for out in outcomes:
            self.metrics.problems.labels(out.stage.value if out.stage else "dropped").inc()
            self.metrics.generated_tokens.inc(out.generated_tokens)
            for ex in out.examples:
                self.metrics.examples.labels(ex.stage.value).inc()

    async def _heartbeat(self) -> None:
        """Keep running chunks' idle time low so no other replica claims them."""
        interval = self.cfg.claim_idle_ms / 3000
        while True:
            await asyncio.sleep(interval)
            by_stream: dict[str, list[Any]] = {}
            for task, _ in list(self._inflight.values()):
                by_stream.setdefault(self.keys.job_tasks(task.job_id), []).append(task.entry_id)
            for stream, ids in by_stream.items():
                try:
                    await self.r.xclaim(stream, REWRITER_GROUP, self.consumer, 0, ids, justid=True)
                except (RedisError, OSError) as exc:
                    log.warning("heartbeat on %s failed: %s", stream, exc)

    async def _drain(self, timeout: float = 120.0) -> None:
        """Wait for running chunks; cancel what is left after `timeout` (it stays pending for others)."""
        running = [runner for _, runner in self._inflight.values()]
        if not running:
            return
        log.info("waiting for %d running chunk(s) to finish", len(running))
        _, late = await asyncio.wait(running, timeout=timeout)
        for runner in late:
            runner.cancel()
        if late:
            await asyncio.wait(late)


def _task(job_id: str, entry_id: bytes | str, data: dict[Any, Any]) -> Task:
    entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return Task(job_id, entry, int(field(data, "epoch") or 0), int(field(data, "chunk") or 0))
