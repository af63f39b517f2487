"""The closed loop end to end on CPU with a tiny model: real `mindgap serve` (vLLM), real `mindgap train`.

One module-scoped run: the service starts, an online job on the bundled sample feeds the trainer, the
trainer publishes a checkpoint every step, the service reloads each one. The tests then read what that
run left: the service's reload history, the versions stamped on the stream, the service's scores for
a fixed prompt before and after. A corrupt checkpoint is announced last and must be refused while the
service keeps answering. `mindgap up --max-versions 2` runs on its own at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from mindgap.redis_server import RedisServer, free_port
from mindgap.up import ChildSpec, Supervisor
from shared.keys import TRAINER_GROUP, Keys
from shared.schema import Example

pytestmark = [pytest.mark.slow, pytest.mark.redis]

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "sample.jsonl"
API_KEY = "e2e-key"
TRAIN_STEPS = 3
MAX_LAG = 16
DONE = ("trainer",)  # after the fixture, the trainer has finished its steps (exit 0)
# one problem that always ends in the expert stage: its example carries the policy's log-probs of a
# fixed response on a fixed prompt, a deterministic read-out of the weights being served
PROBE = {
    "rows": [{"id": "probe", "question": "What is 6 times 7?", "solution": "6 times 7 is 42.\n#### 42"}],
    "params": {"k": 0, "resolve_attempts": 0, "max_tokens": 16, "score": True},
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mindgap", *args]


def _engine_env() -> dict[str, str]:
    """The tiny model in float32 with a small KV cache, as the other tiny-model tests run it."""
    return {
        "MINDGAP_ENGINE__DTYPE": "float32",
        "MINDGAP_ENGINE__MAX_MODEL_LEN": "1024",
        "MINDGAP_ENGINE__KV_CACHE_GIB": "1",
        "MINDGAP_POLICY_POLL_S": "0.5",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }


def _wait(what: str, sup: Supervisor, check: Any, timeout: float, *, allow_exit: tuple[str, ...] = ()) -> Any:
    """Poll `check()` until it returns something truthy; fail early if a child died."""
    deadline = time.monotonic() + timeout
    while True:
        for child in sup.children:
            code = child.proc.poll()
            if code is not None and not (child.name in allow_exit and code == 0):
                pytest.fail(f"{child.name} exited with {code} while waiting for {what}:\n{child.log_tail(40)}")
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {c.name}\n{c.log_tail(20)}" for c in sup.children)
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(0.5)


@dataclass
class LoopRun:
    """What the module's loop left behind, for the tests to read."""

    sup: Supervisor
    http: httpx.Client
    r: redis.Redis
    keys: Keys
    checkpoints: Path
    probe_before: list[list[float]] = field(default_factory=list)
    probe_after: list[float] = field(default_factory=list)
    stream_versions: list[int] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)
    trainer_exit: int | None = None


def _probe(http: httpx.Client) -> tuple[int, list[float]]:
    resp = http.post("/v1/rewrite", json=PROBE)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    (example,) = body["examples"]
    assert example["stage"] == "expert"
    return body["policy_version"], example["target_logprobs"]


@pytest.fixture(scope="module")
def loop(
    tiny_model_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoopRun]:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    redis_url = redis_server.url
    prefix = f"e2e-{os.getpid()}"
    keys = Keys(prefix)
    work = tmp_path_factory.mktemp("loop")
    port = free_port()
    common = {"MINDGAP_REDIS_URL": redis_url, "MINDGAP_KEY_PREFIX": prefix}
    sup = Supervisor(work / "logs", grace_s=30)
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    )
    r = redis.Redis.from_url(redis_url)
    run = LoopRun(sup=sup, http=http, r=r, keys=keys, checkpoints=work / "checkpoints")
    try:
        sup.start(
            ChildSpec(
                "service",
                _cli("serve", "--host", "127.0.0.1", "--port", str(port), "--model", str(tiny_model_dir)),
                # a bound like `mindgap up`'s: the job runs at most MAX_LAG examples ahead of the trainer, so
                # the engine does not hold both cores for minutes while the trainer starts
                {
                    **common,
                    **_engine_env(),
                    "MINDGAP_API_KEYS": API_KEY,
                    "MINDGAP_ADMIN_KEYS": API_KEY,
                    "MINDGAP_MAX_LAG": str(MAX_LAG),
                },
            )
        )

        def ready() -> bool:
            try:
                return http.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        _wait("service /readyz", sup, ready, timeout=600)
        run.probe_before = [_probe(http)[1] for _ in range(2)]

        spec = {"mode": "online", "params": {"k": 2, "resolve_attempts": 1, "max_tokens": 32}}
        with SAMPLE.open("rb") as f:
            resp = http.post("/v1/jobs", data={"spec": json.dumps(spec)}, files={"file": (SAMPLE.name, f)})
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]

        trainer = sup.start(
            ChildSpec(
                "trainer",
                _cli(
                    "train",
                    *("--source", "redis", "--model", str(tiny_model_dir), "--run-name", "e2e"),
                    *("--max-steps", str(TRAIN_STEPS), "--checkpoint-every", "1", "--batch-size", "2"),
                    *("--zero-stage", "0", "--precision", "fp32", "--lr", "1e-2", "--warmup-steps", "0"),
                    *("--checkpoint-dir", str(run.checkpoints)),
                ),
                {**common, "DS_ACCELERATOR": "cpu"},
            )
        )
        _wait("the trainer to finish", sup, lambda: trainer.proc.poll() is not None, 600, allow_exit=DONE)
        run.trainer_exit = trainer.proc.returncode
        published = int(r.hget(keys.policy, "version") or 0)
        _wait(
            f"the service to load v{published}",
            sup,
            lambda: http.get("/v1/policy").json()["version"] == published,
            120,
            allow_exit=DONE,
        )
        run.policy = http.get("/v1/policy").json()
        version, run.probe_after = _probe(http)
        assert version == published

        # The online job keeps sampling under each loaded policy, but the trainer has stopped reading and the
        # job is held back at MAX_LAG unread examples. Read what the trainer left, as its next run would; the
        # job resumes under the version now served, so wait for the first example stamped with it.
        r.xreadgroup(TRAINER_GROUP, "e2e-drain", {keys.examples: ">"}, count=100 * MAX_LAG)

        def made_under_a_published_policy() -> bool:
            recent = r.xrevrange(keys.examples, count=50)
            return any(Example.model_validate_json(f[b"data"]).policy_version > 0 for _, f in recent)

        _wait("an example made under a published policy", sup, made_under_a_published_policy, 300, allow_exit=DONE)
        http.post(f"/v1/jobs/{job_id}/cancel")
        run.stream_versions = [
            Example.model_validate_json(fields[b"data"]).policy_version for _, fields in r.xrange(keys.examples)
        ]
        yield run
    finally:
        sup.stop()
        http.close()
        r.close()


@pytest.mark.vllm
def test_trainer_publishes_versions_and_the_service_loads_each(loop: LoopRun) -> None:
    assert loop.trainer_exit == 0
    ready = sorted(int(p.name[1:]) for p in loop.checkpoints.glob("v*") if (p / "READY").is_file())
    assert len(ready) >= 2 and ready[-1] >= TRAIN_STEPS
    loaded = [h["version"] for h in loop.policy["history"] if h["outcome"] == "loaded" and h["version"] > 0]
    assert len(set(loaded)) >= 2
    assert loop.policy["version"] == max(loaded)
    assert all(h["duration_s"] < 60 for h in loop.policy["history"])


@pytest.mark.vllm
def test_stream_versions_never_go_back_and_do_change(loop: LoopRun) -> None:
    versions = loop.stream_versions
    assert versions, "no examples reached the stream"
    assert versions == sorted(versions), f"policy versions went backwards in the stream: {versions}"
    assert len(set(versions)) >= 2, f"every example carries the same version: {set(versions)}"


@pytest.mark.vllm
def test_service_output_for_a_fixed_prompt_changes_after_a_reload(loop: LoopRun) -> None:
    first, again = loop.probe_before
    assert first == again, "the probe is not deterministic under fixed weights"
    assert len(loop.probe_after) == len(first)
    assert max(abs(a - b) for a, b in zip(first, loop.probe_after, strict=True)) > 1e-3


def _announce(loop: LoopRun, version: int, path: Path) -> None:
    loop.r.hset(loop.keys.policy, mapping={"version": version, "path": str(path)})
    loop.r.publish(loop.keys.policy_events, json.dumps({"version": version, "path": str(path)}))


def _outcome(loop: LoopRun, version: int) -> str | None:
    for h in loop.http.get("/v1/policy").json()["history"]:
        if h["version"] == version:
            return str(h["outcome"])
    return None


@pytest.mark.vllm
def test_corrupt_or_incomplete_checkpoints_are_refused_while_serving_goes_on(loop: LoopRun) -> None:
    served = loop.policy["version"]
    newest = max(p for p in loop.checkpoints.glob("v*") if (p / "READY").is_file())
    # a folder whose weights are garbage but which claims to be complete
    corrupt = loop.checkpoints / "v900"
    shutil.copytree(newest, corrupt)
    for weights in corrupt.glob("*.safetensors"):
        weights.write_bytes(b"\x00not a safetensors file" * 64)
    _announce(loop, 900, corrupt)
    verdict = _wait("the corrupt checkpoint's verdict", loop.sup, lambda: _outcome(loop, 900), 120, allow_exit=DONE)
    assert verdict == "failed"
    # a folder without READY: the trainer crashed mid-save
    partial = loop.checkpoints / "v901"
    shutil.copytree(newest, partial)
    (partial / "READY").unlink()
    _announce(loop, 901, partial)
    verdict = _wait("the partial checkpoint's verdict", loop.sup, lambda: _outcome(loop, 901), 60, allow_exit=DONE)
    assert verdict == "refused"

    assert loop.http.get("/v1/policy").json()["version"] == served
    version, logprobs = _probe(loop.http)
    assert version == served
    assert logprobs == pytest.approx(loop.probe_after, abs=1e-5), "the old weights no longer serve"


def test_mindgap_up_stops_by_itself_after_max_versions(tiny_model_dir: Path, tmp_path: Path) -> None:
    # the fake engine keeps this test about orchestration; the tests above reload real vLLM weights
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    train_config = tmp_path / "train.toml"
    train_config.write_text('zero_stage = 0\nprecision = "fp32"\nbatch_size = 2\nwarmup_steps = 0\n')
    env = {k: v for k, v in os.environ.items() if k != "MINDGAP_REDIS_URL"}
    env |= {**_engine_env(), "DS_ACCELERATOR": "cpu"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        _cli(
            "up",
            str(SAMPLE),
            *("--model", str(tiny_model_dir), "--backend", "fake", "--max-versions", "2", "--checkpoint-every", "1"),
            *("--k", "2", "--resolve-attempts", "1", "--max-tokens", "32"),
            *("--train-config", str(train_config), "--run-dir", str(run_dir)),
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((run_dir / "logs").glob("*.log")))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs}"
    assert "reached --max-versions" in proc.stdout
    loaded = re.findall(r"\bv(\d+)\b.*\bloaded\b", proc.stdout)
    assert len(set(loaded)) >= 2, proc.stdout
    # nothing the loop started (redis-server, service, trainer ranks) outlives it
    survivors = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(run_dir).encode() in cmdline.read_bytes():
                survivors.append(cmdline.parent.name)
        except OSError:
            continue
    assert not survivors, f"processes of the loop still running: {survivors}"
