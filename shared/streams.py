"""Redis stream helpers shared by the service (producer) and the trainer (consumer).

Delivery is at-least-once everywhere, so producers are idempotent: `publish_examples` adds an example to
the stream only if its deterministic id is new in its job's set of published ids, checked and written
atomically in Lua (the service's chunk commits are idempotent per chunk instead: services/job_store.py).
Backpressure bounds what is unread: a producer waits while the trainer group's lag is above a bound, and
trimming never drops an entry the group has not acknowledged (`trainer_read_bound`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.keys import TRAINER_GROUP, Keys
from shared.schema import Example

# KEYS[1] published ids set, KEYS[2] examples stream; ARGV: (id, json) pairs. Returns how many were new.
_PUBLISH_LUA = """
local added = 0
for i = 1, #ARGV, 2 do
  if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[2], '*', 'id', ARGV[i], 'data', ARGV[i + 1])
    added = added + 1
  end
end
return added
"""


async def ensure_group(r: aioredis.Redis, stream: str, group: str, start: str = "0") -> None:
    """Create consumer `group` on `stream` (and the stream) if missing; `start="0"` sees all history."""
    try:
        await r.xgroup_create(stream, group, id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def group_lag(r: aioredis.Redis, stream: str, group: str) -> int:
    """Entries in `stream` not yet delivered to `group` (0 when the group is missing)."""
    for info in await r.xinfo_groups(stream):
        name = info["name"]
        if (name.decode() if isinstance(name, bytes) else name) != group:
            continue
        lag = info.get("lag")
        if lag is not None:
            return int(lag)
        # Redis cannot tell the lag after deletions; fall back to entries-read against the length.
        read = info.get("entries-read") or 0
        return max(0, int(await r.xlen(stream)) - int(read))
    return 0


async def trainer_read_bound(r: aioredis.Redis, stream: str, group: str) -> tuple[int, int] | None:
    """The entry id `(ms, seq)` below which `group` has read and acknowledged every entry of `stream`.

    That is its oldest pending entry, or else the id just after its last delivered one. None when the
    stream or the group is missing: then nothing is known to be read.
    """
    try:
        groups = await r.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return None
    for info in groups:
        if _text(info["name"]) == group:
            pending = await r.xpending(stream, group)
            if pending["pending"]:
                return _entry_id(pending["min"])
            ms, seq = _entry_id(info["last-delivered-id"])
            return ms, seq + 1
    return None


def _entry_id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def backpressure_reason(lag: int, max_lag: int) -> str | None:
    """Why a producer holds back: `trainer lag N > max_lag M` when the lag is over the bound (0 disables), else None."""
    return f"trainer lag {lag} > max_lag {max_lag}" if max_lag > 0 and lag > max_lag else None


async def wait_for_capacity(
    r: aioredis.Redis,
    stream: str,
    group: str,
    max_lag: int,
    poll_s: float = 0.5,
    timeout_s: float | None = None,
) -> float:
    """Block while `group`'s lag on `stream` exceeds `max_lag` (0 disables); return seconds waited."""
    if max_lag <= 0:
        return 0.0
    start = time.monotonic()
    while backpressure_reason(await group_lag(r, stream, group), max_lag) is not None:
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"stream {stream} lag stayed above {max_lag} for {timeout_s:.0f}s")
        await asyncio.sleep(poll_s)
    return time.monotonic() - start


async def publish_examples(
    r: aioredis.Redis, keys: Keys, job_id: str, examples: Sequence[Example], max_lag: int = 0
) -> int:
    """Add those of `examples` new to `job_id` to the examples stream; return how many were new."""
    if not examples:
        return 0
    await ensure_group(r, keys.examples, TRAINER_GROUP)
    await wait_for_capacity(r, keys.examples, TRAINER_GROUP, max_lag)
    argv: list[str] = []
    for ex in examples:
        argv += [ex.id, ex.model_dump_json()]
    added = await r.eval(_PUBLISH_LUA, 2, keys.job_published(job_id), keys.examples, *argv)
    return int(added)


async def dead_letter(
    r: aioredis.Redis, keys: Keys, source: str, entry_id: str, payload: Mapping[str, Any] | str, reason: str
) -> None:
    """Park an entry that cannot be processed in the dead-letter stream, with the reason."""
    data = payload if isinstance(payload, str) else json.dumps(payload, default=str)
    await r.xadd(
        keys.deadletter,
        {
            "source": source,
            "entry_id": entry_id,
            "reason": reason,
            "data": data,
            "time": f"{time.time():.3f}",
        },
    )


def field(entry: Mapping[bytes | str, bytes | str], name: str) -> str | None:
    """A stream entry's field as text, whether the client decodes responses or not."""
    value = entry.get(name)
    if value is None:
        value = entry.get(name.encode())
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value
