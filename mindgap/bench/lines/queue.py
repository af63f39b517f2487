"""Queue line: examples/s through the examples stream (publish, read, ack) against Redis's own XADD rate.

mindgap's side is what the service and the trainer do per example: the service's chunk commit
(`JobStore.commit_chunk`, one Lua script: chunk mark, counters, one XADD per example and the chunk's entry
range as the job's result) in chunks from one process, while another process reads the trainer group with
XREADGROUP, parses each record into an `Example` and XACKs it. The rate counts an example once it is
acknowledged. The baseline is `redis-benchmark` running `XADD mystream * data <one example's JSON>` (default 50
clients, no pipelining), on the same throwaway server; where redis-benchmark is missing, pipelined
XADDs from redis-py stand in and the row says so.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import shutil
import subprocess
import time
import uuid
from multiprocessing.synchronize import Barrier
from typing import Any

import numpy as np
import redis
import redis.asyncio as aioredis

from mindgap.bench.context import BenchContext
from mindgap.bench.report import LineResult
from mindgap.bench.timings import Row, summarize
from mindgap.redis_server import RedisServer
from services.job_store import JobStore, chunk_key
from shared.config import StageParams
from shared.keys import TRAINER_GROUP, Keys
from shared.schema import ChatMessage, Example, Problem, Sampling, Stage, example_id, wire_logprobs
from shared.streams import ensure_group
from shared.wire import JobSpec

TARGET = 0.35  # issue 16: end to end (publish, read, parse, ack) against a bare XADD of the same payload


def sample_example(index: int, tokens: int = 256, seed: int = 0) -> Example:
    """A realistic self-stage example: `tokens` completion tokens with both log-prob lists."""
    rng = random.Random(seed * 1_000_003 + index)
    ids = [rng.randrange(49_152) for _ in range(tokens)]
    # float32 values, as the engine returns them, stored the way the pipeline stores them
    behavior = np.array([-rng.expovariate(2.0) for _ in range(tokens)], dtype=np.float32)
    target = behavior - np.array([rng.random() * 0.1 for _ in range(tokens)], dtype=np.float32)
    words = " ".join(f"w{rng.randrange(10_000)}" for _ in range(tokens * 3 // 4))
    return Example(
        id=example_id("bench", index),
        problem_id=f"p{index}",
        prompt=[ChatMessage(role="user", content="Solve: what is 12 * 7 + 3? Put the answer in \\boxed{}.")],
        completion=[ChatMessage(role="assistant", content=words + " \\boxed{87}")],
        completion_token_ids=ids,
        stage=Stage.SELF,
        policy_version=0,
        sampling=Sampling(temperature=0.7, top_p=1.0),
        behavior_logprobs=wire_logprobs(behavior.tolist()),
        target_logprobs=wire_logprobs(target.tolist()),
        answer="87",
        grade="correct",
        meta={"self_attempts": 4},
    )


def _producer(url: str, prefix: str, n: int, batch: int, barrier: Barrier) -> None:
    examples = [sample_example(i) for i in range(n)]

    async def main() -> None:
        r = aioredis.Redis.from_url(url)
        store = JobStore(r, Keys(prefix), ttl_s=3600)
        problems = [Problem(id=ex.problem_id, question="q", answer="87") for ex in examples]
        job = await store.create(problems, [], JobSpec(), StageParams(), chunk_size=batch)  # makes the group too
        barrier.wait()
        for chunk, start in enumerate(range(0, n, batch)):
            part = examples[start : start + batch]
            pairs = [(ex.id, ex.model_dump_json()) for ex in part]
            await store.commit_chunk(job.id, chunk_key(0, chunk), {"problems_done": len(part)}, pairs, 0)
        await r.aclose()

    asyncio.run(main())


def _consumer(url: str, prefix: str, n: int, batch: int, barrier: Barrier, done: Any) -> None:
    async def main() -> float:
        r = aioredis.Redis.from_url(url)
        keys = Keys(prefix)
        await ensure_group(r, keys.examples, TRAINER_GROUP)
        barrier.wait()
        acked = 0
        while acked < n:
            reply: Any = await r.xreadgroup(TRAINER_GROUP, "bench", {keys.examples: ">"}, count=batch, block=1000)
            for _stream, entries in reply or []:
                ids = []
                for entry_id, fields in entries:
                    Example.model_validate_json(fields[b"data"])  # what the trainer does with every entry
                    ids.append(entry_id)
                acked += await r.xack(keys.examples, TRAINER_GROUP, *ids)
        finished = time.monotonic()
        await r.aclose()
        return finished

    done.put(asyncio.run(main()))


def stream_rate(url: str, n: int, batch: int) -> float:
    """Seconds for `n` examples to be published by one process and read, parsed and acked by another."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    done = ctx.Queue()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    procs = [
        ctx.Process(target=_producer, args=(url, prefix, n, batch, barrier)),
        ctx.Process(target=_consumer, args=(url, prefix, n, batch, barrier, done)),
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    start = time.monotonic()
    finished = float(done.get(timeout=600))
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise RuntimeError(f"queue bench {p.name} exited with {p.exitcode}")
    with redis.Redis.from_url(url) as r:
        for key in r.scan_iter(f"{prefix}:*"):
            r.delete(key)
    return finished - start


class ServerCPU:
    """CPU seconds the Redis server used inside a `with` block, per item of `items` (`us_per_item`)."""

    def __init__(self, admin: redis.Redis, items: int) -> None:
        self.admin, self.items, self.us_per_item = admin, items, 0.0

    def _cpu(self) -> float:
        info: Any = self.admin.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def __enter__(self) -> ServerCPU:
        self.start = self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.us_per_item = (self._cpu() - self.start) / self.items * 1e6


def redis_benchmark_rate(port: int, n: int, payload: str, pipeline: int = 1) -> float:
    """XADD/s that `redis-benchmark` reports for `XADD mystream * data <payload>` against 127.0.0.1:`port`."""
    exe = shutil.which("redis-benchmark")
    assert exe is not None
    # `-t xadd` and `-d` sized values are missing from redis-benchmark 7.0, so the command is spelt out.
    out = subprocess.run(
        [exe, "-h", "127.0.0.1", "-p", str(port), "-n", str(n), "-P", str(pipeline), "-q", "--csv",
         "xadd", "mystream", "*", "data", payload],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        # "test","rps",…7 figures: the test name is the command itself, payload commas included.
        cells = [c.strip('"') for c in line.rsplit(",", 7)]
        if cells[0].lower().startswith("xadd"):
            return float(cells[1])
    raise RuntimeError(f"no XADD figure in redis-benchmark output: {out[:500]!r}")


def redis_py_xadd_rate(url: str, n: int, payload: str, batch: int) -> float:
    """XADD/s of pipelined redis-py XADDs of `payload` (the stand-in when redis-benchmark is missing)."""
    stream = f"bench-raw-{uuid.uuid4().hex[:8]}"
    with redis.Redis.from_url(url) as r:
        start = time.monotonic()
        for base in range(0, n, batch):
            pipe = r.pipeline(transaction=False)
            for _ in range(min(batch, n - base)):
                pipe.xadd(stream, {"data": payload})
            pipe.execute()
        seconds = time.monotonic() - start
        r.delete(stream)
    return n / seconds


def codec_rates(n: int = 500) -> dict[str, float]:
    """Examples/s of the two Python costs on the path, in this process: JSON encoding and validated parsing."""
    examples = [sample_example(i) for i in range(n)]
    start = time.monotonic()
    payloads = [ex.model_dump_json() for ex in examples]
    encoded = time.monotonic()
    for payload in payloads:
        Example.model_validate_json(payload)
    parsed = time.monotonic()
    return {"encode_per_s": n / (encoded - start), "parse_per_s": n / (parsed - encoded)}


def run(
    ctx: BenchContext, parts: frozenset[str] = frozenset({"queue"}), n: int | None = None, batch: int = 64
) -> LineResult:
    """Measure the queue line; `n` examples per repetition (2000 quick, 10000 full by default)."""
    n = n or (2000 if ctx.quick else 10_000)
    payload = sample_example(0).model_dump_json()
    size = len(payload.encode())
    have_benchmark = shutil.which("redis-benchmark") is not None
    ours: list[float] = []
    theirs: list[float] = []
    ceiling: list[float] = []
    server_us: dict[str, list[float]] = {"mindgap": [], "xadd": []}
    with RedisServer(ctx.scratch("queue")) as server, redis.Redis.from_url(server.url) as admin:
        stream_rate(server.url, min(n, 200), batch)  # warm-up: process start, Lua script cache, allocator
        for _ in range(ctx.repeat):
            with ServerCPU(admin, n) as cpu:
                ours.append(n / stream_rate(server.url, n, batch))
            server_us["mindgap"].append(cpu.us_per_item)
            if have_benchmark:
                with ServerCPU(admin, n) as cpu:
                    theirs.append(redis_benchmark_rate(server.port, n, payload))
                server_us["xadd"].append(cpu.us_per_item)
                ceiling.append(redis_benchmark_rate(server.port, n, payload, pipeline=batch))
            else:
                theirs.append(redis_py_xadd_rate(server.url, n, payload, batch))
            admin.delete("mystream")  # redis-benchmark's stream
    baseline = "redis-benchmark XADD (50 clients, no pipelining)" if have_benchmark else "redis-py pipelined XADD"
    note = (
        f"{n} examples of {size} B JSON per repetition, batches of {batch}; mindgap counts an example once a"
        " second process has read, parsed and acked it; the server runs without persistence."
    )
    codec = codec_rates()
    note += (
        f" One core encodes {codec['encode_per_s']:,.0f} and parses+validates {codec['parse_per_s']:,.0f}"
        " examples/s in Python alone."
    )
    if server_us["xadd"]:
        ours_us, xadd_us = summarize(server_us["mindgap"]).median, summarize(server_us["xadd"]).median
        note += (
            f" Redis itself spends {ours_us:.0f} µs of CPU per example on mindgap's path (the chunk commit"
            f" stores it once, in the stream, then XREADGROUP and XACK) against {xadd_us:.0f} µs"
            " per XADD: with the Python encode and parse beside it, the three processes share 2 cores."
        )
    if ceiling:
        note += f" The server's pipelined XADD ceiling (-P {batch}) was {summarize(ceiling).median:,.0f}/s."
    if not have_benchmark:
        note += " redis-benchmark was not on PATH: the baseline is redis-py pipelined XADD of the same payload."
    row = Row(
        line="queue",
        metric="examples/s published+consumed+acked",
        unit="examples/s",
        mindgap=summarize(ours),
        baseline=summarize(theirs),
        baseline_name=baseline,
        target=TARGET,
        note=note,
    )
    info = {"examples": n, "batch": batch, "payload_bytes": size, "pipelined_xadd_per_s": ceiling}
    return LineResult(name="queue", rows=[row], info=info | codec | {"server_cpu_us_per_example": server_us})
