"""The delivery contract end to end: SIGKILL the trainer after a checkpoint, restart, every example trained once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from shared.keys import TRAINER_GROUP, Keys
from shared.schema import Example
from shared.streams import publish_examples
from tests.trainer_support import ROOT, make_examples, read_metrics, run_train, train_argv, train_env
from trainer.checkpoint import read_state, ready_versions

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.chaos]


def _publish(url: str, keys: Keys, examples: list[Example]) -> None:
    async def go() -> None:
        r = aioredis.Redis.from_url(url)
        try:
            await publish_examples(r, keys, "job", examples)
        finally:
            await r.aclose()

    asyncio.run(go())


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}")
        if metrics.exists() and any(r["step"] >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.5)
    raise AssertionError(f"trainer did not reach step {step} in {timeout}s")


def test_sigkill_after_checkpoint_then_resume(
    tiny_model_dir: Path, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    keys = Keys(key_prefix)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    examples = make_examples(tiny_model_dir, 24, tag="k")
    _publish(redis_url, keys, examples[:12])
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    argv = train_argv(
        tiny_model_dir,
        ckpt,
        source="redis",
        redis_url=redis_url,
        prefix=key_prefix,
        consumer="t0",
        run_name="kill",
        batch_size=2,
        checkpoint_every=4,
        keep_checkpoints=10,
        max_steps=100,
        loss="is",
        zero_stage=2,
        metrics_jsonl=metrics,
    )
    with (tmp_path / "first.log").open("wb") as log:
        proc = subprocess.Popen(
            argv, env=train_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            # v1 is written at step 4; steps 5-6 train 4 more entries, then the trainer waits for data.
            _wait_for_step(metrics, 6, proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert ready_versions(ckpt) == [1]
    assert len(read_state(ckpt, 1)["trained_ids"]) == 8
    # The updates of the 4 entries trained after v1 died with the process: they are still pending.
    assert r.xpending(keys.examples, TRAINER_GROUP)["pending"] == 4

    _publish(redis_url, keys, examples[12:])
    bad = json.loads(examples[0].model_dump_json()) | {"id": "misaligned", "behavior_logprobs": [-1.0]}
    r.xadd(keys.examples, {"id": "misaligned", "data": json.dumps(bad)})
    r.xadd(keys.examples, {"id": "garbled", "data": "{not json"})
    run_train([*argv, "--idle-exit-s", "3"])

    versions = ready_versions(ckpt)
    trained = [i for v in versions for i in read_state(ckpt, v)["trained_ids"]]
    # Over the whole run every produced example is trained exactly once in the lineage of the final weights.
    assert sorted(trained) == sorted(e.id for e in examples)
    assert all(read_state(ckpt, v)["resumed_from"] == 1 for v in versions[1:])
    assert r.xpending(keys.examples, TRAINER_GROUP)["pending"] == 0
    dead = {e[1]["entry_id"]: e[1]["reason"] for e in r.xrange(keys.deadletter)}
    assert len(dead) == 2
    assert any("behavior_logprobs has 1 entries" in reason for reason in dead.values())
    assert r.hget(keys.policy, "version") == str(versions[-1])
    assert r.hget(keys.policy, "path") == str((ckpt / f"v{versions[-1]}").resolve())
    assert r.hget(keys.trainer_state("kill"), "step") == "12"
