"""Helpers for the trainer tests: example records for a tiny model's tokenizer, publishing, running `mindgap train`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from shared.keys import Keys
from shared.schema import ChatMessage, Example, Sampling, Stage
from shared.streams import publish_examples

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def make_examples(model_dir: Path, n: int, tag: str = "ex") -> list[Example]:
    """`n` examples of varied completion length (EOS last), cycling through the three stages."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for i in range(n):
        text = "the answer is " + " ".join(WORDS[(i + j) % 10] for j in range(1 + i % 5))
        ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        stage = (Stage.SELF, Stage.GUIDED, Stage.EXPERT)[i % 3]
        behavior = None if stage is Stage.EXPERT else [-1.0 - 0.1 * (t % 7) for t in range(len(ids))]
        out.append(
            Example(
                id=f"{tag}-{i}",
                problem_id=f"p{i}",
                prompt=[ChatMessage(role="user", content=f"What is {WORDS[i % 10]} plus {WORDS[(i * 3) % 10]}?")],
                completion=[ChatMessage(role="assistant", content=text)],
                completion_token_ids=ids,
                stage=stage,
                policy_version=0,
                # temperature 1: the ratio's π_θ is the trained one, as the trainer tests expect
                sampling=None if behavior is None else Sampling(temperature=1.0, top_p=1.0),
                behavior_logprobs=behavior,
                target_logprobs=[-1.0] * len(ids),
                answer=str(i),
                grade="reference" if stage is Stage.EXPERT else "correct",
            )
        )
    return out


def publish(url: str, keys: Keys, examples: list[Example]) -> None:
    """Publish `examples` to the examples stream at `url` as one job's results, as the service does."""

    async def go() -> None:
        r = aioredis.Redis.from_url(url)
        try:
            await publish_examples(r, keys, "job", examples)
        finally:
            await r.aclose()

    asyncio.run(go())


def write_jsonl(path: Path, rows: list[Example]) -> Path:
    """Write example records as JSONL."""
    path.write_text("".join(r.model_dump_json() + "\n" for r in rows))
    return path


def train_argv(model_dir: Path, ckpt_dir: Path, **options: Any) -> list[str]:
    """`python -m mindgap train …` with fp32 defaults suited to a tiny model on CPU, `options` as flags."""
    opts: dict[str, Any] = {
        "model": model_dir,
        "checkpoint_dir": ckpt_dir,
        "precision": "fp32",
        "lr": 1e-2,
        "warmup_steps": 0,
        "min_lr_ratio": 1.0,
        "micro_batch_size": 1,
    } | options
    argv = [sys.executable, "-m", "mindgap", "train"]
    for key, value in opts.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def train_env() -> dict[str, str]:
    """The environment for a trainer subprocess: CPU DeepSpeed, the repo importable, no stray MINDGAP_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINDGAP_") or k == "MINDGAP_CACHE"}
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_train(argv: list[str], timeout: float = 600) -> str:
    """Run a trainer to completion and return its output; on failure or timeout kill its whole process group."""
    proc = subprocess.Popen(
        argv,
        env=train_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun and its ranks share the session: none of them may outlive the test.
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"trainer timed out after {timeout:.0f}s:\n{out[-4000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"trainer exited {proc.returncode}:\n{out[-4000:]}")
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metrics JSONL a trainer wrote, one dict per logged step."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
