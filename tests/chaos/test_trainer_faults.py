"""The trainer under faults: its Redis source across a lost reply, a restart and a freeze; the whole trainer
SIGKILLed mid-epoch beside a producing service while Redis restarts and freezes.

Afterwards the set of examples the trainer consumed (the trained and dropped ids recorded in its
checkpoints' states) equals the set produced into the stream, each exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from mindgap.redis_server import RedisServer
from shared.keys import TRAINER_GROUP, Keys
from shared.schema import Example
from shared.streams import field
from tests.support.chaos_jobs import check_job, freeze, submit
from tests.support.service import ServeProcess
from tests.support.trainer import ROOT, publish, read_metrics, train_argv, train_env
from trainer.checkpoint import read_state, ready_versions
from trainer.data import RedisSource, TrainItem

pytestmark = [pytest.mark.chaos, pytest.mark.redis, pytest.mark.slow]


def _item(example: Example, entry_id: str) -> TrainItem:
    return TrainItem(example.id, entry_id, [1, 2, 3], 1, None, example.policy_version, example.stage.value)


def _examples(n: int) -> list[Example]:
    return [
        Example.model_validate(
            {
                "id": f"ex-{i}",
                "problem_id": f"p{i}",
                "prompt": [{"role": "user", "content": f"q{i}"}],
                "completion": [{"role": "assistant", "content": f"a{i}"}],
                "completion_token_ids": [5, 6],
                "stage": "expert",
                "policy_version": 0,
                "behavior_logprobs": None,
                "target_logprobs": [-1.0, -1.0],
                "answer": str(i),
                "grade": "reference",
            }
        )
        for i in range(n)
    ]


def test_redis_source_survives_a_lost_reply_a_restart_and_a_freeze(chaos_redis: RedisServer, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    examples = _examples(30)
    publish(chaos_redis.url, keys, examples[:10])
    source = RedisSource(chaos_redis.url, keys, "t0", _item, idle_exit_s=3.0, block_ms=200)
    r = redis.Redis.from_url(chaos_redis.url)
    got: list[str] = []
    try:
        items, _ = source.next_items(4)
        got += [it.example_id for it in items]
        source.commit([it.entry_id for it in items])  # as after a checkpoint
        # A read whose reply never arrived (timed out): Redis moved the entries into our pending list.
        r.xreadgroup(TRAINER_GROUP, "t0", {keys.examples: ">"}, count=3)
        chaos_redis.restart()
        publish(chaos_redis.url, keys, examples[10:20])
        items, _ = source.next_items(8)
        got += [it.example_id for it in items]
        frozen = threading.Thread(target=freeze, args=(chaos_redis, 7.0))  # past the 5 s socket timeout
        frozen.start()
        time.sleep(0.3)
        items, _ = source.next_items(4)  # waits the freeze out
        got += [it.example_id for it in items]
        frozen.join()
        publish(chaos_redis.url, keys, examples[20:])
        exhausted = False
        while not exhausted:
            items, exhausted = source.next_items(8)
            got += [it.example_id for it in items]
    finally:
        source.close()
    assert Counter(got) == Counter(ex.id for ex in examples)  # every entry once, the stranded three included


def _stream_ids(r: redis.Redis, keys: Keys) -> list[str]:
    return [field(data or {}, "id") or "" for _, data in r.xrange(keys.examples) or []]


def _consumed(ckpt: Path) -> Counter[str]:
    """Example ids in the segments of every published checkpoint (trained or dropped as stale)."""
    consumed: Counter[str] = Counter()
    for version in ready_versions(ckpt):
        state = read_state(ckpt, version)
        consumed.update(state["trained_ids"])
        consumed.update(state["dropped_ids"])
    return consumed


ROWS = 16  # 16 examples (keep=1), 4 per step: about 5 steps with the replayed segment


def _wait_step(metrics: Path, step: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"trainer exited {proc.returncode}: {log.read_text()[-3000:]}"
        if metrics.exists() and any(row["step"] >= step for row in read_metrics(metrics)):
            return
        time.sleep(0.2)
    raise AssertionError(f"trainer did not reach step {step} in {timeout}s: {log.read_text()[-3000:]}")


def _wait_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"trainer exited {proc.returncode}: {log.read_text()[-3000:]}"
        if text in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not logged in {timeout}s: {log.read_text()[-3000:]}")


def test_trainer_sigkilled_mid_epoch_beside_a_producing_service_consumes_each_example_once(
    tiny_model_dir: Path,
    chaos_serve: Callable[..., ServeProcess],
    chaos_redis: RedisServer,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    keys = Keys(key_prefix)
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    argv = train_argv(
        tiny_model_dir,
        ckpt,
        source="redis",
        redis_url=chaos_redis.url,
        key_prefix=key_prefix,
        consumer="t0",
        batch_size=4,
        checkpoint_every=2,
        keep_checkpoints=1000,  # every segment stays on disk: they are the consumed set
        max_steps=1000,
        idle_exit_s=5,  # finishes by itself once the stream stays empty (replayed entries come first)
        zero_stage=0,
        metrics_jsonl=metrics,
    )

    def start_trainer(name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, env=train_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return proc, log

    serve = chaos_serve()
    first, first_log = start_trainer("trainer-1")
    second: subprocess.Popen[bytes] | None = None
    try:
        serve.start()
        r = redis.Redis.from_url(chaos_redis.url)
        with httpx.Client(base_url=serve.url, timeout=30) as http:
            job = submit(http, n=ROWS)
            _wait_step(metrics, 1, first, first_log)
            chaos_redis.restart()  # mid-run, under both the service and the trainer
            _wait_step(metrics, 3, first, first_log)  # past the v1 checkpoint (step 2), mid-segment
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(30)
            second, second_log = start_trainer("trainer-2")
            _wait_log(second_log, "resumed from", second)
            # frozen while the resumed trainer replays its pending entries: past every client's socket
            # timeout (trainer 5 s, service 1 s)
            freeze(chaos_redis, 7.0)
            check_job(http, r, keys, job, n=ROWS)
        assert second.wait(300) == 0, second_log.read_text()[-3000:]
        produced = _stream_ids(r, keys)
        consumed = _consumed(ckpt)
        assert len(produced) == len(set(produced)) == ROWS
        assert consumed == Counter(produced), "the trainer lost or repeated examples"
        pending = r.xpending(keys.examples, TRAINER_GROUP)
        assert pending["pending"] == 0, pending  # everything consumed was acknowledged
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
