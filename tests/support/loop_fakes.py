"""Stand-ins for the service and the trainer, so `mindgap up`'s supervision is tested on its own.

`python -m tests.support.loop_fakes service|trainer|drive …`: the fake service answers the few REST calls the
orchestrator makes and "reloads" each version the fake trainer announces in Redis; `drive` runs
`run_up` on a JSON plan in a process of its own, so tests can send it SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

from shared.config import StageParams
from shared.keys import Keys
from shared.wire import JobCreated, JobState, JobStatus, PolicyStatus, ReloadRecord


def _on_sigterm(record: Path) -> None:
    def handler(signum: int, frame: Any) -> None:
        (record / f"{os.getpid()}.terminated").touch()
        os._exit(0)

    signal.signal(signal.SIGTERM, handler)


def _job(state: JobState) -> dict[str, Any]:
    """The one job's status, as the real service would answer it (validated by the wire model)."""
    examples = {"self": 3, "guided": 1, "expert": 1}
    return JobStatus(
        id="job-1",
        state=state,
        mode="online",
        epochs=None,
        epoch=0,
        created_at=time.time(),
        problems=5,
        rows_rejected=0,
        chunks=1,
        chunks_done=0,
        chunks_failed=0,
        problems_done=5,
        progress=None,
        stages=examples,
        dropped=0,
        ungradable=0,
        examples=examples,
        examples_total=sum(examples.values()),
        generated_tokens=0,
        policy_versions=[],
        errors=[],
        params=StageParams(),
        fields={},
    ).model_dump(mode="json")


def serve(args: argparse.Namespace) -> None:
    """A tiny HTTP server with /readyz, /v1/policy and the job calls `run_up` makes."""
    record = Path(args.record)
    _on_sigterm(record)
    r = redis.Redis.from_url(os.environ["MINDGAP_REDIS_URL"])
    keys = Keys(os.environ["MINDGAP_KEY_PREFIX"])
    api_key = os.environ["MINDGAP_API_KEYS"]
    started = time.monotonic()
    lock = threading.Lock()
    policy = PolicyStatus(version=0, path=None, reloading=False, history=[])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *a: Any) -> None:
            sys.stderr.write(format % a + "\n")

        def _json(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {api_key}":
                self._json(401, {"detail": "bad key"})
                return False
            return True

        def do_GET(self) -> None:
            if self.path == "/readyz":
                ready = time.monotonic() - started >= args.ready_after
                self._json(200 if ready else 503, {"ready": ready})
            elif not self._authorized():
                return
            elif self.path == "/v1/policy":
                with lock:
                    published = int(r.hget(keys.policy, "version") or 0)
                    if published > policy.version:
                        path = f"/ckpt/v{published}"
                        policy.version, policy.path = published, path
                        policy.history.append(
                            ReloadRecord(
                                time=time.time(),
                                version=published,
                                path=path,
                                duration_s=0.01,
                                outcome="loaded",
                                source="event",
                            )
                        )
                    self._json(200, policy.model_dump(mode="json"))
            elif re.fullmatch(r"/v1/jobs/[\w-]+", self.path):
                self._json(200, _job("running"))
            else:
                self._json(404, {"detail": "not found"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not self._authorized():
                return
            if self.path == "/v1/jobs":
                (record / "submitted").write_bytes(body)
                created = JobCreated(id="job-1", state="queued", problems=5, rows_rejected=0, chunks=1)
                self._json(201, created.model_dump(mode="json"))
            elif self.path == "/v1/jobs/job-1/cancel":
                (record / "cancelled").touch()
                self._json(200, _job("cancelled"))
            else:
                self._json(404, {"detail": "not found"})

    (record / f"service.{os.getpid()}").touch()
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


def train(args: argparse.Namespace) -> None:
    """Announce a new policy version and trainer progress every `--every` seconds; optionally fail."""
    record = Path(args.record)
    _on_sigterm(record)
    (record / f"trainer.{os.getpid()}").touch()
    r = redis.Redis.from_url(os.environ["MINDGAP_REDIS_URL"])
    keys = Keys(os.environ["MINDGAP_KEY_PREFIX"])
    started = time.monotonic()
    step = 0
    while True:
        time.sleep(args.every)
        if args.fail_after is not None and time.monotonic() - started > args.fail_after:
            print("fake trainer: simulated crash", flush=True)
            sys.exit(3)
        step += 1
        r.hset(keys.trainer_state("up"), mapping={"step": step, "loss": 1.0 / step})
        if not args.no_publish:
            r.hincrby(keys.policy, "version", 1)


def drive(args: argparse.Namespace) -> None:
    """Run `run_up` on a plan given as JSON, print the result as JSON."""
    from mindgap.up import ChildSpec, UpConfig, UpPlan, run_up

    raw = json.loads(Path(args.plan).read_text())
    plan = UpPlan(
        cfg=UpConfig(**raw["cfg"]),
        run_dir=Path(raw["run_dir"]),
        service=ChildSpec(**raw["service"]),
        trainer=ChildSpec(**raw["trainer"]),
        service_url=raw["service_url"],
        api_key=raw["api_key"],
    )
    result = asyncio.run(run_up(plan))
    print(json.dumps({"reason": result.reason, "versions": [r.version for r in result.reloads]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(required=True)
    s = sub.add_parser("service")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--record", required=True)
    s.add_argument("--ready-after", type=float, default=0.0)
    s.set_defaults(func=serve)
    t = sub.add_parser("trainer")
    t.add_argument("--record", required=True)
    t.add_argument("--every", type=float, default=0.3)
    t.add_argument("--fail-after", type=float, default=None)
    t.add_argument("--no-publish", action="store_true")
    t.set_defaults(func=train)
    d = sub.add_parser("drive")
    d.add_argument("plan")
    d.set_defaults(func=drive)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
