"""`mindgap doctor`: the smoke test a user runs on a fresh GPU box or inside the compose images.

It reports versions, devices and free memory, then runs a tiny end-to-end on one model, one line per
step with its verdict and time:

  engine     start vLLM (the version check against the tested release is part of it)
  rewrite    Guided Re-solving of the 8 bundled problems (mindgap/data/sample.jsonl)
  score      the engine's prompt log-probs of one record against a transformers forward pass
  reload     a copy of the weights loaded into the running engine; the same record scores the same
  train      2 DFT steps of `python -m trainer` under ZeRO-2 on the records (a single rank runs stage 0)

Without vLLM (the lent GPU machines have only torch) the engine steps are SKIPPED and `score` compares
transformers with itself in the engine's place no further: it checks that the forward pass runs and gives
finite log-probs, and `train` trains on expert records built from the bundled problems.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from mindgap.data import SAMPLE
from services import vllm_version
from shared.config import EngineConfig, StageParams
from shared.dataio import read_problems
from shared.schema import Example

PROBLEMS = 8
# Per-token |log p_vLLM − log p_transformers| allowed in the score step. Both run the same weights in the
# same dtype, but kernels differ (vLLM's fused attention, bf16 accumulation order): measured on the 2-core
# CPU with the default model in bf16 at mean 0.018 / max 0.13 nats (bench/results/doctor-cpu-*.json).
# A broken scoring path (wrong position, wrong template, temperature applied) is off by whole nats.
MEAN_TOLERANCE = 0.05
MAX_TOLERANCE = 0.5
Verdict = Literal["PASS", "FAIL", "SKIP"]


@dataclass
class Step:
    name: str
    verdict: Verdict
    seconds: float
    detail: str

    def line(self) -> str:
        return f"{self.verdict:4}  {self.name:8} {self.seconds:7.1f} s  {self.detail}"


@dataclass
class Report:
    environment: dict[str, Any]
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.verdict != "FAIL" for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"environment": self.environment, "steps": [asdict(s) for s in self.steps], "ok": self.ok}


def environment() -> dict[str, Any]:
    """Versions, devices and free memory: what a bug report about the GPU path needs first."""
    import torch

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("mindgap", "torch", "transformers", "deepspeed", *vllm_version.DISTRIBUTIONS):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    devices: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append(
                {
                    "device": f"cuda:{i}",
                    "name": torch.cuda.get_device_name(i),
                    "free_gib": free / 2**30,
                    "total_gib": total / 2**30,
                }
            )
    pages, page = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    devices.append(
        {
            "device": "cpu",
            "name": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "free_gib": pages * page / 2**30,
            "total_gib": os.sysconf("SC_PHYS_PAGES") * page / 2**30,
        }
    )
    supported, line = vllm_version.check(vllm_version.installed_release(), vllm_version.tested_release())
    return {"versions": versions, "devices": devices, "vllm_check": line, "vllm_supported": supported}


def environment_lines(env: dict[str, Any]) -> list[str]:
    versions = "  ".join(f"{k} {v}" for k, v in env["versions"].items() if v is not None)
    lines = [f"versions  {versions}", f"vllm      {env['vllm_check']}"]
    for d in env["devices"]:
        extra = f", {d['cores']} cores" if "cores" in d else ""
        lines.append(
            f"device    {d['device']}: {d['name']}{extra}, {d['free_gib']:.1f} of {d['total_gib']:.1f} GiB free"
        )
    return lines


@contextmanager
def _timed(report: Report, name: str, emit: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Run a step: the body fills `out["detail"]` (and may set `out["verdict"]`); an exception is a FAIL."""
    out: dict[str, Any] = {"verdict": "PASS", "detail": ""}
    started = time.perf_counter()
    try:
        yield out
    except Exception as exc:  # a smoke test reports every failure as its line and goes on
        out["verdict"], out["detail"] = "FAIL", f"{type(exc).__name__}: {exc}"
    step = Step(name, out["verdict"], time.perf_counter() - started, out["detail"])
    report.steps.append(step)
    emit(step.line())


def transformers_logprobs(model_dir: str, prompt_ids: list[int], completion_ids: list[int], dtype: str) -> list[float]:
    """log p(completion_ids[t] | prompt, completion[:t]) from a plain transformers forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' stubs type .to() oddly
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    with torch.no_grad():
        logits = model(ids).logits.float()
    # logits at position i predict token i+1: the completion's tokens are predicted from len(prompt)-1 on
    logp = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1], dim=-1)
    target = torch.tensor(completion_ids, device=device)
    return logp.gather(-1, target[:, None])[:, 0].tolist()


def compare(engine_lp: list[float], hf_lp: list[float]) -> tuple[bool, str]:
    """Whether two log-prob lists agree within the stated tolerance, and the line that says by how much."""
    if len(engine_lp) != len(hf_lp) or not engine_lp:
        return False, f"lengths differ: engine {len(engine_lp)}, transformers {len(hf_lp)}"
    diffs = [abs(a - b) for a, b in zip(engine_lp, hf_lp, strict=True)]
    mean, worst = sum(diffs) / len(diffs), max(diffs)
    ok = mean <= MEAN_TOLERANCE and worst <= MAX_TOLERANCE and all(map(math.isfinite, engine_lp))
    return ok, (
        f"{len(diffs)} tokens, |Δ log p| mean {mean:.4f} max {worst:.4f} nats "
        f"(tolerance {MEAN_TOLERANCE} / {MAX_TOLERANCE})"
    )


async def _engine_steps(
    report: Report, cfg: EngineConfig, work: Path, emit: Callable[[str], None]
) -> tuple[list[Example], str | None]:
    """engine, rewrite, score, reload on one vLLM engine; the records written and the resolved model folder."""
    from services.pipeline import rewrite_batch
    from services.vllm_engine import VLLMEngine
    from shared.grading import Grader

    engine: VLLMEngine | None = None
    records: list[Example] = []
    model_dir: str | None = None
    with _timed(report, "engine", emit) as out:
        engine = await VLLMEngine.create(cfg)
        model_dir = engine.model_path
        out["detail"] = f"vLLM engine on {model_dir} ({engine.dtype})"
    if engine is None or model_dir is None:
        return records, model_dir
    try:
        with _timed(report, "rewrite", emit) as out:
            problems = read_problems(SAMPLE, limit=PROBLEMS).problems
            params = StageParams(k=2, resolve_attempts=2, max_tokens=160)
            with Grader(1, 10.0) as grader:
                outcomes = await rewrite_batch(problems, engine, grader, params, id_salt="doctor")
            records = [ex for o in outcomes for ex in o.examples]
            stages = Counter(ex.stage.value for ex in records)
            if len({ex.problem_id for ex in records}) != len(problems):
                out["verdict"] = "FAIL"
            out["detail"] = f"{len(problems)} problems → {len(records)} records " + json.dumps(stages)
        if not records:
            return records, model_dir
        record = next((ex for ex in records if ex.behavior_logprobs), records[0])
        prompt_ids = engine.render_prompt(record.prompt)
        before: list[float] = []
        with _timed(report, "score", emit) as out:
            before = await engine.score(prompt_ids, record.completion_token_ids)
            hf = transformers_logprobs(model_dir, prompt_ids, record.completion_token_ids, engine.dtype)
            ok, out["detail"] = compare(before, hf)
            out["detail"] = f"{record.stage.value} record: {out['detail']}"
            if not ok:
                out["verdict"] = "FAIL"
        with _timed(report, "reload", emit) as out:
            copy = work / "weights-copy"
            shutil.copytree(model_dir, copy)
            await engine.reload(str(copy))
            after = await engine.score(prompt_ids, record.completion_token_ids)
            worst = max((abs(a - b) for a, b in zip(before, after, strict=True)), default=0.0)
            out["detail"] = f"reloaded {copy.name}; same record scores within {worst:.2e} nats"
            if worst > 1e-3 or not before:
                out["verdict"] = "FAIL"
    finally:
        await engine.shutdown()  # frees the accelerator for the training step
    return records, model_dir


def _train_step(report: Report, records: list[Example], model: str, work: Path, emit: Callable[[str], None]) -> None:
    """2 DFT steps of the real trainer entry (`python -m trainer`) under ZeRO-2 on `records`."""
    import torch

    with _timed(report, "train", emit) as out:
        data = work / "records.jsonl"
        data.write_text("".join(ex.model_dump_json() + "\n" for ex in records))
        metrics = work / "train-metrics.jsonl"
        argv = [
            sys.executable,
            "-m",
            "trainer",
            "--source",
            str(data),
            "--model",
            model,
            "--loss",
            "dft",
            "--zero-stage",
            "2",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--micro-batch-size",
            "1",
            "--warmup-steps",
            "0",
            "--checkpoint-dir",
            str(work / "ckpt"),
            "--checkpoint-every",
            "2",
            "--no-resume",
            "--publish",
            "false",
            "--metrics-jsonl",
            str(metrics),
            "--epochs",
            "4",
        ]
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"trainer exited {proc.returncode}: {tail}")
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        losses = [r["loss"] for r in rows if "loss" in r]
        if len(rows) < 2 or not all(map(math.isfinite, losses)):
            out["verdict"] = "FAIL"
        # DFT weights each token's NLL by its probability: near 0 on a model that predicts nothing (random
        # weights), so the plain NLL and the gradient norm are shown beside it.
        out["detail"] = (
            f"{len(rows)} steps, DFT loss "
            + " → ".join(f"{x:.4g}" for x in losses)
            + ", NLL "
            + " → ".join(f"{r['nll']:.4g}" for r in rows)
            + ", grad norm "
            + " → ".join(f"{r['grad_norm']:.3g}" for r in rows)
        )


def _expert_records(model: str) -> list[Example]:
    """Expert records of the bundled problems, tokenised with the model's template (no engine needed)."""
    from transformers import AutoTokenizer

    from shared.model_source import resolve_model
    from shared.prompts import completion_token_ids, solve_messages, turn_end_ids
    from shared.schema import ChatMessage, Stage, example_id

    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    turn_end = turn_end_ids(tok)
    records = []
    for p in read_problems(SAMPLE, limit=PROBLEMS).problems:
        text = p.solution or p.answer or ""
        records.append(
            Example(
                id=example_id("doctor", p.id, Stage.EXPERT, 0),
                problem_id=p.id,
                prompt=solve_messages(p.question),
                completion=[ChatMessage(role="assistant", content=text)],
                completion_token_ids=completion_token_ids(tok, text, turn_end),
                stage=Stage.EXPERT,
                policy_version=0,
                behavior_logprobs=None,
                answer=p.answer,
                grade="reference",
            )
        )
    return records


def run(model: str = "default", emit: Callable[[str], None] = print, keep: Path | None = None) -> Report:
    """Run every step on `model`; each step's line goes to `emit` as soon as it is known."""
    import torch

    env = environment()
    for line in environment_lines(env):
        emit(line)
    report = Report(env)
    on_gpu = torch.cuda.is_available()
    cfg = EngineConfig(
        model=model,
        enforce_eager=not on_gpu,  # torch.compile costs minutes on a small CPU; a GPU box pays it once
        max_model_len=1024,
        gpu_memory_utilization=0.4,  # leaves room for the training step's model on the same GPU
        kv_cache_gib=None if on_gpu else 1,
    )
    with tempfile.TemporaryDirectory(prefix="mindgap-doctor-") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        records: list[Example] = []
        model_dir: str | None = None
        if vllm_version.installed_release() is None:
            for name in ("engine", "rewrite", "score", "reload"):
                step = Step(name, "SKIP", 0.0, "vLLM is not installed")
                report.steps.append(step)
                emit(step.line())
        else:
            records, model_dir = asyncio.run(_engine_steps(report, cfg, work, emit))
        if not records:
            with _timed(report, "records", emit) as out:
                records = _expert_records(model)
                out["detail"] = f"{len(records)} expert records from the bundled problems (no engine records)"
        _train_step(report, records, model_dir or model, work, emit)
    return report
