"""The job store: job state, counters, problems, row errors and results, all in Redis.

A job moves queued → running → completed | failed | cancelled. Its problems sit in a Redis list and its
work in its own task stream as chunks `(epoch, chunk)`; a chunk's results are committed by one Lua script
that marks the chunk done, adds the counters and appends the examples to the examples stream — all or
nothing, and only the first time, so a redelivered chunk (a replica died after the commit but before its
ack) changes nothing. The same script finishes an epoch: it queues the next epoch of an online job, or
settles the final state and sets the expiry of a finished job's keys (noting when, so the creation-time
index of jobs is pruned as new jobs arrive and Redis does not grow with every job).

A record is stored once, in the examples stream the trainer reads. A job's results are references into
it: for each committed chunk the ids of its first and last entry (one script's XADDs are contiguous, so
the range holds exactly that chunk's examples), read back with XRANGE in input order. The stream is
trimmed by job lifetime, not by acknowledgement: `trim_examples` drops only entries older than both the
oldest entry a live (unexpired) job refers to and the trainer group's oldest unacknowledged one, so a
job's results stay downloadable until the job expires and nothing the trainer has not acked is dropped.

A status read answers within `read_timeout_s` or raises redis' TimeoutError (a 503 for the API) however long
Redis hangs, and says why an unfinished job makes no progress while the trainer lags more than `max_lag`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import redis.asyncio as aioredis
from pydantic import TypeAdapter

from services.guidance_filter import REASONS
from services.pipeline import ProblemOutcome
from shared.config import StageParams
from shared.keys import REWRITER_GROUP, TRAINER_GROUP, Keys
from shared.retry import deadline
from shared.schema import Problem, Stage
from shared.streams import backpressure_reason, ensure_group, field, group_lag, trainer_read_bound
from shared.wire import FINISHED_STATES, JobCreated, JobSpec, JobStatus, RowError

STAGE_NAMES = tuple(s.value for s in Stage)
SHOWN_ERRORS = 100
ROW_ERROR: TypeAdapter[RowError] = TypeAdapter(RowError)

# KEYS: 1 job, 2 done set, 3 results (chunk → entry range), 4 examples stream, 5 versions, 6 active set,
#       7 task stream, 8 problems, 9 errors, 10 chunk errors, 11 expiring index, 12 stream holds.
# ARGV: 1 chunk key, 2 job id, 3 now, 4 ttl, 5 policy version or '', 6 error or '',
#       7 number of counters, counter (name, increment) pairs, number of examples, example (id, json) pairs.
# Returns -1 job finished/unknown (nothing done), 0 chunk already committed, 1 committed,
#         2 committed and the next epoch queued, 3 committed and the job finished.
_COMPLETE_LUA = """
local job = KEYS[1]
local state = redis.call('HGET', job, 'state')
if state ~= 'queued' and state ~= 'running' then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
local i = 8
for _ = 1, tonumber(ARGV[7]) do
  redis.call('HINCRBY', job, ARGV[i], ARGV[i + 1])
  i = i + 2
end
local n_examples = tonumber(ARGV[i])
i = i + 1
local first, last
for _ = 1, n_examples do
  -- same entry format as shared.streams.publish_examples, committed together with the chunk mark
  last = redis.call('XADD', KEYS[4], '*', 'id', ARGV[i], 'data', ARGV[i + 1])
  first = first or last
  i = i + 2
end
if first then
  redis.call('HSET', KEYS[3], ARGV[1], first .. ' ' .. last)
  -- the job's oldest entry (its ms part) keeps the stream from being trimmed past it while the job lives
  redis.call('ZADD', KEYS[12], 'NX', tonumber(string.match(first, '^%d+')), ARGV[2])
end
if ARGV[5] ~= '' then redis.call('SADD', KEYS[5], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', job, 'error', ARGV[6]) end
redis.call('HSET', job, 'state', 'running', 'updated_at', ARGV[3])
redis.call('HSETNX', job, 'started_at', ARGV[3])
redis.call('HINCRBY', job, 'chunks_done', 1)
local done = redis.call('HINCRBY', job, 'epoch_chunks_done', 1)
local chunks = tonumber(redis.call('HGET', job, 'chunks'))
if done < chunks then return 1 end
local epoch = tonumber(redis.call('HGET', job, 'epoch'))
local epochs = tonumber(redis.call('HGET', job, 'epochs'))
if epochs == 0 or epoch + 1 < epochs then
  redis.call('HSET', job, 'epoch', epoch + 1, 'epoch_chunks_done', 0)
  for c = 0, chunks - 1 do
    redis.call('XADD', KEYS[7], '*', 'epoch', epoch + 1, 'chunk', c)
  end
  return 2
end
local failed = tonumber(redis.call('HGET', job, 'chunks_failed') or '0')
local final = 'completed'
if failed > 0 then final = 'failed' end
redis.call('HSET', job, 'state', final, 'finished_at', ARGV[3])
redis.call('SREM', KEYS[6], ARGV[2])
for _, k in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[7], KEYS[8], KEYS[9], KEYS[10]}) do
  redis.call('EXPIRE', k, ARGV[4])
end
redis.call('ZADD', KEYS[11], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[2])
return 3
"""

# KEYS: 1 job, 2 active set, 3 expiring index, then every key of the job to expire. ARGV: 1 job id, 2 now, 3 ttl.
# Returns the state before: only 'queued'/'running' become 'cancelled'.
_CANCEL_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return state end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[2], 'updated_at', ARGV[2])
redis.call('SREM', KEYS[2], ARGV[1])
for i = 4, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[3], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return state
"""

# KEYS: 1 expiring index, 2 jobs index, 3 stream holds. ARGV: 1 now. Drops (a bounded batch of) jobs whose
# keys expired, and with them their hold on the examples stream.
_PRUNE_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[3], id)
end
return #ids
"""

_MARK_RUNNING_LUA = """
if redis.call('HGET', KEYS[1], 'state') == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1], 'updated_at', ARGV[1])
end
return 1
"""


class Commit(IntEnum):
    """What committing a chunk did."""

    JOB_GONE = -1
    DUPLICATE = 0
    COMMITTED = 1
    NEXT_EPOCH = 2
    JOB_FINISHED = 3


@dataclass(frozen=True)
class JobInfo:
    """What a worker needs to run a job's chunks."""

    id: str
    state: str
    mode: str
    chunk_size: int
    problems: int
    params: StageParams

    @property
    def finished(self) -> bool:
        """Whether the job takes no more work."""
        return self.state in FINISHED_STATES


def chunk_key(epoch: int, chunk: int) -> str:
    """The id of chunk `chunk` of epoch `epoch` in a job's done set."""
    return f"{epoch}:{chunk}"


def outcome_counters(outcomes: Sequence[ProblemOutcome]) -> dict[str, int]:
    """Job-hash counter increments for a chunk's outcomes."""
    counters: dict[str, int] = {"problems_done": len(outcomes)}
    for out in outcomes:
        counters["generated_tokens"] = counters.get("generated_tokens", 0) + out.generated_tokens
        counters["ungradable"] = counters.get("ungradable", 0) + int(out.ungradable)
        if out.stage is None:
            counters["dropped"] = counters.get("dropped", 0) + 1
        else:
            counters[f"p:{out.stage.value}"] = counters.get(f"p:{out.stage.value}", 0) + 1
        for ex in out.examples:
            counters[f"e:{ex.stage.value}"] = counters.get(f"e:{ex.stage.value}", 0) + 1
        for reason, n in out.guidance_rejected.items():
            if n:
                counters[f"g:{reason}"] = counters.get(f"g:{reason}", 0) + n
    return counters


class JobStore:
    """Jobs in Redis under `keys`; finished jobs expire after `ttl_s`.

    `max_lag` is the producers' backpressure bound (0: none), `read_timeout_s` the most a status read may take.
    """

    def __init__(
        self, r: aioredis.Redis, keys: Keys, ttl_s: int, max_lag: int = 0, read_timeout_s: float = 5.0
    ) -> None:
        self.r = r
        self.keys = keys
        self.ttl_s = ttl_s
        self.max_lag = max_lag
        self.read_timeout_s = read_timeout_s
        self._complete = r.register_script(_COMPLETE_LUA)
        self._cancel = r.register_script(_CANCEL_LUA)
        self._prune = r.register_script(_PRUNE_LUA)
        self._mark_running = r.register_script(_MARK_RUNNING_LUA)

    def _job_keys(self, job_id: str) -> list[str]:
        k = self.keys
        return [
            k.job_done(job_id),
            k.job_results(job_id),
            k.job_versions(job_id),
            k.job_tasks(job_id),
            k.job_problems(job_id),
            k.job_errors(job_id),
            k.job_chunk_errors(job_id),
        ]

    async def create(
        self,
        problems: Sequence[Problem],
        errors: Sequence[RowError],
        spec: JobSpec,
        params: StageParams,
        chunk_size: int,
    ) -> JobCreated:
        """Store a new job and queue its first epoch; `problems` must not be empty."""
        job_id = uuid.uuid4().hex[:16]
        k = self.keys
        chunks = -(-len(problems) // chunk_size)
        now = time.time()
        # The index would otherwise keep one id per job ever created: drop the expired ones as we go.
        await self.trim_examples(now)
        epochs = 1 if spec.mode == "once" else (spec.epochs or 0)  # 0: until cancelled
        # Serialising a big upload takes seconds of pure Python: not on the event loop that answers /healthz.
        rows = await asyncio.to_thread(lambda: [p.model_dump_json() for p in problems])
        await ensure_group(self.r, k.job_tasks(job_id), REWRITER_GROUP)
        await ensure_group(self.r, k.examples, TRAINER_GROUP)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(
                k.job(job_id),
                mapping={
                    "id": job_id,
                    "name": spec.name or "",
                    "state": "queued",
                    "mode": spec.mode,
                    "epochs": epochs,
                    "epoch": 0,
                    "chunks": chunks,
                    "chunk_size": chunk_size,
                    "problems": len(problems),
                    "rows_rejected": len(errors),
                    "created_at": f"{now:.3f}",
                    "updated_at": f"{now:.3f}",
                    "params": params.model_dump_json(),
                    "fields": json.dumps(spec.fields),
                },
            )
            for start in range(0, len(rows), 1000):
                pipe.rpush(k.job_problems(job_id), *rows[start : start + 1000])
            for start in range(0, len(errors), 1000):
                pipe.rpush(k.job_errors(job_id), *(ROW_ERROR.dump_json(e) for e in errors[start : start + 1000]))
            for c in range(chunks):
                pipe.xadd(k.job_tasks(job_id), {"epoch": 0, "chunk": c})
            pipe.zadd(k.jobs, {job_id: now})
            pipe.sadd(k.active_jobs, job_id)
            await pipe.execute()
        return JobCreated(
            id=job_id,
            state="queued",
            problems=len(problems),
            rows_rejected=len(errors),
            chunks=chunks,
            errors=list(errors[:SHOWN_ERRORS]),
        )

    async def info(self, job_id: str) -> JobInfo | None:
        """The fields a worker needs, or None for an unknown (or expired) job."""
        raw = await self.r.hmget(self.keys.job(job_id), ["state", "mode", "chunk_size", "problems", "params"])
        if raw[0] is None:
            return None
        state, mode, chunk_size, problems, params = (_text(v) for v in raw)
        return JobInfo(
            id=job_id,
            state=state,
            mode=mode,
            chunk_size=int(chunk_size),
            problems=int(problems),
            params=StageParams.model_validate_json(params),
        )

    async def waiting(self) -> str | None:
        """Why unfinished jobs make no progress now: `trainer lag N > max_lag M`, or None."""
        if not self.max_lag:
            return None
        return backpressure_reason(await group_lag(self.r, self.keys.examples, TRAINER_GROUP), self.max_lag)

    async def status(self, job_id: str) -> JobStatus | None:
        """The full status of a job, or None when unknown."""
        async with deadline(self.read_timeout_s, f"status of job {job_id}"):
            return await self._status(job_id, await self.waiting())

    async def _status(self, job_id: str, waiting: str | None) -> JobStatus | None:
        raw = await self.r.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        h = {_text(key): _text(v) for key, v in raw.items()}
        versions = await self.r.smembers(self.keys.job_versions(job_id))
        errors = await self.r.lrange(self.keys.job_errors(job_id), 0, SHOWN_ERRORS - 1)

        def num(name: str) -> int:
            return int(h.get(name) or 0)

        def opt_time(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        epochs = num("epochs")
        chunks = num("chunks")
        examples = {s: num(f"e:{s}") for s in STAGE_NAMES}
        return JobStatus(
            id=job_id,
            name=h.get("name") or None,
            state=h["state"],
            mode=h["mode"],
            epochs=epochs or None,
            epoch=num("epoch"),
            created_at=float(h["created_at"]),
            started_at=opt_time("started_at"),
            finished_at=opt_time("finished_at"),
            problems=num("problems"),
            rows_rejected=num("rows_rejected"),
            chunks=chunks,
            chunks_done=num("chunks_done"),
            chunks_failed=num("chunks_failed"),
            problems_done=num("problems_done"),
            progress=min(1.0, num("chunks_done") / (chunks * epochs)) if epochs and chunks else None,
            stages={s: num(f"p:{s}") for s in STAGE_NAMES},
            dropped=num("dropped"),
            ungradable=num("ungradable"),
            examples=examples,
            examples_total=sum(examples.values()),
            generated_tokens=num("generated_tokens"),
            guidance_rejected={r: num(f"g:{r}") for r in REASONS},
            policy_versions=sorted(int(_text(v)) for v in versions),
            errors=[ROW_ERROR.validate_json(e) for e in errors],
            error=h.get("error") or None,
            params=StageParams.model_validate_json(h["params"]),
            fields=json.loads(h.get("fields") or "{}"),
            waiting=waiting if h["state"] not in FINISHED_STATES else None,
        )

    async def recent(self, limit: int = 100) -> list[JobStatus]:
        """The newest `limit` jobs; ids of expired jobs are dropped from the index on the way."""
        async with deadline(self.read_timeout_s, "the job list"):
            ids = [_text(i) for i in await self.r.zrevrange(self.keys.jobs, 0, limit - 1)]
            waiting = await self.waiting()
            jobs: list[JobStatus] = []
            for job_id in ids:
                status = await self._status(job_id, waiting)
                if status is None:
                    await self.r.zrem(self.keys.jobs, job_id)
                else:
                    jobs.append(status)
            return jobs

    async def cancel(self, job_id: str) -> str | None:
        """Cancel a queued or running job; the state it had before (None when unknown)."""
        k = self.keys
        before = await self._cancel(
            keys=[k.job(job_id), k.active_jobs, k.jobs_expiring, *self._job_keys(job_id)],
            args=[job_id, f"{time.time():.3f}", self.ttl_s],
        )
        return _text(before) if before is not None else None

    async def active(self) -> list[str]:
        """Ids of jobs with work left, sorted for a stable round-robin order."""
        return sorted(_text(i) for i in await self.r.smembers(self.keys.active_jobs))

    async def retire(self, job_id: str) -> None:
        """Drop a job that no longer exists (expired) from the active set."""
        await self.r.srem(self.keys.active_jobs, job_id)

    async def mark_running(self, job_id: str) -> None:
        """queued → running, when the first chunk starts."""
        await self._mark_running(keys=[self.keys.job(job_id)], args=[f"{time.time():.3f}"])

    async def chunk_problems(self, job: JobInfo, chunk: int) -> list[Problem]:
        """The problems of chunk `chunk` of `job`."""
        start = chunk * job.chunk_size
        raw = await self.r.lrange(self.keys.job_problems(job.id), start, start + job.chunk_size - 1)
        return [Problem.model_validate_json(p) for p in raw]

    async def commit_chunk(
        self,
        job_id: str,
        key: str,
        counters: dict[str, int],
        examples: Iterable[tuple[str, str]] = (),
        policy_version: int | None = None,
        error: str = "",
    ) -> Commit:
        """Commit a chunk's counters and `(example id, json)` results exactly once (see module docstring)."""
        k = self.keys
        pairs = list(examples)
        args: list[Any] = [key, job_id, f"{time.time():.3f}", self.ttl_s]
        args += ["" if policy_version is None else policy_version, error, len(counters)]
        for name, inc in counters.items():
            args += [name, inc]
        args.append(len(pairs))
        for ex_id, data in pairs:
            args += [ex_id, data]
        result = await self._complete(
            keys=[
                k.job(job_id),
                k.job_done(job_id),
                k.job_results(job_id),
                k.examples,
                k.job_versions(job_id),
                k.active_jobs,
                k.job_tasks(job_id),
                k.job_problems(job_id),
                k.job_errors(job_id),
                k.job_chunk_errors(job_id),
                k.jobs_expiring,
                k.examples_holds,
            ],
            args=args,
        )
        return Commit(int(result))

    async def fail_chunk(self, job_id: str, key: str, reason: str) -> Commit:
        """Count a chunk as done but failed (dead-lettered); the job ends `failed` when it finishes."""
        return await self.commit_chunk(job_id, key, {"chunks_failed": 1}, error=reason)

    async def note_chunk_error(self, job_id: str, entry_id: str, reason: str) -> None:
        """Remember why processing a task entry failed (the dead-letter reason if it keeps failing)."""
        await self.r.hset(self.keys.job_chunk_errors(job_id), entry_id, reason[:2000])

    async def chunk_error(self, job_id: str, entry_id: str) -> str | None:
        """The last error noted for a task entry."""
        value = await self.r.hget(self.keys.job_chunk_errors(job_id), entry_id)
        return _text(value) if value is not None else None

    async def results(self, job_id: str, batch: int = 64) -> AsyncIterator[str]:
        """The job's example records as JSON strings, in input order: epoch by epoch, chunk by chunk."""
        refs = await self.r.hgetall(self.keys.job_results(job_id))
        ranges = sorted(
            (tuple(int(part) for part in _text(key).split(":")), _text(ref).split()) for key, ref in refs.items()
        )
        for start in range(0, len(ranges), batch):
            async with self.r.pipeline(transaction=False) as pipe:
                for _, (first, last) in ranges[start : start + batch]:
                    pipe.xrange(self.keys.examples, first, last)
                for entries in await pipe.execute():
                    for _, fields in entries:
                        data = field(fields, "data")
                        if data is not None:
                            yield data

    async def trim_examples(self, now: float | None = None) -> int:
        """Drop the stream entries no live job refers to and the trainer has acked; how many went.

        Expired jobs release their hold first. The bounds are read outside a transaction, which is safe
        because both only move forward: new entries, new jobs and new deliveries all come after them.
        Without a trainer group nothing is known to be read, and nothing is trimmed.
        """
        k = self.keys
        await self._prune(keys=[k.jobs_expiring, k.jobs, k.examples_holds], args=[f"{now or time.time():.3f}"])
        bound = await trainer_read_bound(self.r, k.examples, TRAINER_GROUP)
        if bound is None:
            return 0
        oldest_hold = await self.r.zrange(k.examples_holds, 0, 0, withscores=True)
        if oldest_hold:
            bound = min(bound, (int(oldest_hold[0][1]), 0))
        trimmed: int = await self.r.xtrim(k.examples, minid=f"{bound[0]}-{bound[1]}", approximate=False)
        return trimmed


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
