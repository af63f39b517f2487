"""The delivery contract end to end: SIGKILL the trainer after a checkpoint, restart, every example trained once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from shared.keys import TRAINER_GROUP, Keys
from shared.schema import Example
from tests.support.trainer import ROOT, make_examples, publish, read_metrics, train_argv, train_env
from trainer.checkpoint import read_state, ready_versions
from trainer.data import RedisSource, TrainItem, prepare_item

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.chaos]


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}")
        if metrics.exists() and any(r["step"] >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.5)
    raise AssertionError(f"trainer did not reach step {step} in {timeout}s")


def test_sigkill_after_checkpoint_then_resume_then_sigterm(
    tiny_model_dir: Path, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    keys = Keys(key_prefix)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    examples = make_examples(tiny_model_dir, 24, tag="k")
    publish(redis_url, keys, examples[:12])
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    argv = train_argv(
        tiny_model_dir,
        ckpt,
        source="redis",
        redis_url=redis_url,
        key_prefix=key_prefix,
        consumer="t0",
        run_name="kill",
        batch_size=2,
        checkpoint_every=5,
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
            # v1 is written at step 5; step 6 trains 2 more entries, then the trainer waits for data.
            _wait_for_step(metrics, 6, proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert ready_versions(ckpt) == [1]
    assert len(read_state(ckpt, 1)["trained_ids"]) == 10
    # The updates of the 2 entries trained after v1 died with the process: they are still pending.
    assert r.xpending(keys.examples, TRAINER_GROUP)["pending"] == 2

    publish(redis_url, keys, examples[12:])
    bad = json.loads(examples[0].model_dump_json()) | {"id": "misaligned", "behavior_logprobs": [-1.0]}
    r.xadd(keys.examples, {"id": "misaligned", "data": json.dumps(bad)})
    r.xadd(keys.examples, {"id": "garbled", "data": "{not json"})
    with (tmp_path / "second.log").open("wb") as log:
        proc = subprocess.Popen(argv, env=train_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            # Steps 6-12 train the 2 replayed and 12 new entries (v2 at step 10); then, while the trainer
            # waits for data, SIGTERM makes it write a final checkpoint v3 and exit cleanly.
            _wait_for_step(metrics, 12, proc)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(120) == 0
        finally:
            proc.kill()

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
    assert versions == [1, 2, 3] and read_state(ckpt, 3)["step"] == 12
    assert r.hget(keys.trainer_state("kill"), "step") == "12"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_replay_acks_entries_the_resumed_checkpoint_contains(
    tiny_model_dir: Path, tokenizer, redis_url: str, key_prefix: str
) -> None:
    """A crash between publishing a checkpoint and acking its entries: the restart acks them untrained."""
    keys = Keys(key_prefix)
    r = redis.Redis.from_url(redis_url)
    publish(redis_url, keys, make_examples(tiny_model_dir, 4, tag="r"))

    def prepare(ex: Example, entry_id: str) -> TrainItem:
        return prepare_item(ex, tokenizer, 512, entry_id)

    first = RedisSource(redis_url, keys, "c0", prepare, block_ms=100)
    items, _ = first.next_items(4)
    first.close()
    assert r.xpending(keys.examples, TRAINER_GROUP)["pending"] == 4
    included = [it.entry_id for it in items[:2]]
    second = RedisSource(redis_url, keys, "c0", prepare, idle_exit_s=0.2, already_trained=included, block_ms=100)
    replayed, _ = second.next_items(10)
    assert [it.example_id for it in replayed] == ["r-2", "r-3"]
    assert second.next_items(10) == ([], True)  # nothing more: idle past idle_exit_s
    assert r.xpending(keys.examples, TRAINER_GROUP)["pending"] == 2
    second.commit([it.entry_id for it in replayed])
    assert r.xpending(keys.examples, TRAINER_GROUP)["pending"] == 0
    second.close()


def test_too_long_entries_are_dead_lettered(tiny_model_dir: Path, tokenizer, redis_url: str, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    publish(redis_url, keys, make_examples(tiny_model_dir, 2, tag="long"))
    source = RedisSource(
        redis_url, keys, "c0", lambda ex, eid: prepare_item(ex, tokenizer, 16, eid), idle_exit_s=0.2, block_ms=100
    )
    items, exhausted = source.next_items(2)
    source.close()
    assert items == [] and exhausted
    reasons = [e[1]["reason"] for e in r.xrange(keys.deadletter)]
    assert len(reasons) == 2 and all("exceed max_seq_len 16" in x for x in reasons)
    assert r.xpending(keys.examples, TRAINER_GROUP)["pending"] == 0
