"""Small-scale reproduction of *Mind the Gap* (Zhao et al. 2025) on GSM8K: rewrite, gap, four fine-tunes, eval.

    python experiments/reproduce.py --out runs/repro                 # default size: ~2 h on a 2-core CPU
    python experiments/reproduce.py --out runs/big --train-size 2048 --eval-size 500 --steps 400 --n 16
    python experiments/reproduce.py --out /tmp/toy --toy --model PATH   # minutes, for the test suite

Steps (every artefact lands in `--out`; `commands.txt` lists the exact `mindgap` commands run):
  1. slice `gsm8k/train.jsonl` (seeded shuffle) into a training slice and a disjoint held-out slice;
  2. `mindgap rewrite` the training slice (self → guided → expert);
  3. one in-process engine on the base model: convert the raw slice to expert-stage records (the pipeline
     with k = 0 and no guided attempts: every problem falls back to its expert solution, scored on the
     training prompt), the gap report raw vs rewritten, and the base model's held-out accuracy;
  4. `mindgap train` four times with the same budget (steps × batch): SFT and DFT on raw, SFT and DFT on
     rewritten (plus token-level IS on rewritten with `--is-run`, whose importance weights the trainer logs);
  5. one engine again, reloading each final checkpoint: held-out accuracy and the fine-tuned model's
     NLL on both training sets (how far each run closed the gap);
  6. `results.md` / `results.json` (accuracy table, gap table, timings) and `training.png` (loss,
     grad norm, IS-weight spread from the trainer's JSON metrics log).

The evaluation uses the prompt and grading of `mindgap eval` (mindgap.evaluation.accuracy) on the held-out slice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from mindgap.evaluation import accuracy as evaluate  # noqa: E402
from mindgap.evaluation import gap  # noqa: E402
from mindgap.evaluation.benchmarks import data_dir  # noqa: E402
from shared.config import EngineConfig, StageParams  # noqa: E402
from shared.dataio import FieldMap, atomic_write_jsonl, atomic_write_text, read_problems  # noqa: E402

if TYPE_CHECKING:
    from services.engine import Engine
    from shared.grading import Grader

GSM8K_FIELDS = FieldMap(question="question", answer="answer")
TOY = {
    "train_size": 4, "eval_size": 2, "steps": 2, "batch_size": 2, "n": 2, "max_tokens": 32, "k": 2,
    "resolve_attempts": 1, "eval_max_tokens": 32, "max_model_len": 1024,
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One fine-tune: which training data, which loss."""

    data: str  # "raw" | "rewritten"
    loss: str  # "sft" | "dft" | "is" (token level)
    seed: int | None = None  # training seed; None: --seed (and no suffix in the name)

    @property
    def name(self) -> str:
        """Folder and table name, e.g. `dft-rewritten` (or `dft-rewritten-s1` with its own seed)."""
        return f"{self.loss}-{self.data}" + ("" if self.seed is None else f"-s{self.seed}")


def add_shared_options(p: argparse.ArgumentParser) -> None:
    """The options every reproduction takes: model, rewrite, training budget, evaluation, engine."""
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--model", default="default", help="HF id, local path or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=0, help="data, engine and trainer seed")
    p.add_argument("--k", type=int, default=4, help="rewrite: self-samples per problem")
    p.add_argument("--resolve-attempts", type=int, default=4, help="rewrite: guided attempts per unsolved problem")
    p.add_argument("--guidance", default="solution", help="rewrite: solution | answer | hint")
    p.add_argument("--rewrite-temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=320, help="rewrite: response length cap")
    p.add_argument("--steps", type=int, default=32, help="optimizer steps per fine-tune (same for all)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--precision", default=None, help="bf16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--n", type=int, default=4, help="eval: samples per held-out problem")
    p.add_argument("--temperature", type=float, default=1.0, help="eval: sampling temperature")
    p.add_argument("--eval-max-tokens", type=int, default=320, help="eval: response length cap")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true", help="engine: skip torch.compile (faster start on a CPU)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; `--toy` overrides the sizes with a few-minute setting."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_options(p)
    p.add_argument("--data", type=Path, default=None, help="GSM8K train.jsonl (default: <data dir>/gsm8k/train.jsonl)")
    p.add_argument("--train-size", type=int, default=128, help="problems in the training slice")
    p.add_argument("--eval-size", type=int, default=128, help="problems in the disjoint held-out slice")
    p.add_argument("--losses", default="sft,dft", help="losses trained on both raw and rewritten data")
    p.add_argument("--is-run", action="store_true", help="also train token-level IS (clip 2) on rewritten data")
    p.add_argument(
        "--train-nll", action="store_true", help="also score both training sets under every fine-tune (slow on CPU)"
    )
    p.add_argument("--toy", action="store_true", help="tiny sizes for an end-to-end check in minutes")
    p.add_argument(
        "--resume", action="store_true", help="reuse finished steps in --out (same settings): rewrite, base phase, runs"
    )
    args = p.parse_args(argv)
    if args.toy:
        for key, value in TOY.items():
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------------- helpers


class Recorder:
    """Logs phases with wall-clock timings and the exact commands run."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the run."""
        print(f"\n=== {name}", file=sys.stderr, flush=True)
        start = time.monotonic()
        yield
        self.timings[name] = round(time.monotonic() - start, 1)
        print(f"=== {name}: {self.timings[name]:.0f} s", file=sys.stderr, flush=True)

    def mindgap(self, *args: object) -> None:
        """Run `mindgap ARGS` (as `python -m mindgap`), fail loudly, remember the command."""
        argv = [str(a) for a in args]
        command = "mindgap " + shlex.join(argv)
        with (self.out / "commands.txt").open("a") as f:  # appended: a --resume run keeps the earlier ones
            f.write(command + "\n")
        print("$ " + command, file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "mindgap", *argv], check=True, cwd=ROOT)


def slice_gsm8k(src: Path, out: Path, train_size: int, eval_size: int, seed: int) -> tuple[Path, Path]:
    """Seeded shuffle of the source rows, then a training slice and the disjoint held-out slice after it."""
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    if train_size + eval_size > len(rows):
        raise SystemExit(f"{src} has {len(rows)} rows, fewer than {train_size} + {eval_size}")
    random.Random(seed).shuffle(rows)
    train, heldout = out / "train.jsonl", out / "heldout.jsonl"
    atomic_write_jsonl(train, rows[:train_size])
    atomic_write_jsonl(heldout, rows[train_size : train_size + eval_size])
    return train, heldout


def rewrite(
    args: argparse.Namespace, rec: Recorder, train: Path, out: Path, resume: bool, fields: FieldMap = GSM8K_FIELDS
) -> dict[str, Any]:
    """`mindgap rewrite` of the training file (skipped with `resume` when its summary exists); the summary."""
    summary_path = out.with_name(out.name + ".summary.json")
    if not (resume and summary_path.is_file()):
        field_options = [x for k, v in fields.mapped().items() for x in ("--fields", f"{k}={v}")]
        with rec.phase("rewrite"):
            rec.mindgap(
                "rewrite", train, "-o", out, "--model", args.model, *field_options, "--k", args.k,
                "--resolve-attempts", args.resolve_attempts, "--guidance", args.guidance,
                "--temperature", args.rewrite_temperature, "--max-tokens", args.max_tokens,
                "--max-model-len", args.max_model_len, *(["--enforce-eager"] if args.enforce_eager else []),
            )  # fmt: skip
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary


def final_checkpoint(ckpt_dir: Path) -> Path:
    """The newest complete (READY) `v{N}` folder a training run left."""
    ready = [p.parent for p in ckpt_dir.glob("v*/READY")]
    if not ready:
        raise SystemExit(f"no READY checkpoint in {ckpt_dir}")
    return max(ready, key=lambda p: int(p.name[1:]))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The trainer's JSON metrics lines."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _finite(xs: list[Any]) -> list[float]:
    return [float(x) for x in xs if isinstance(x, int | float) and math.isfinite(x)]


# -------------------------------------------------------------------------------------- engine phases


def engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    """Engine options for both engine phases."""
    # Prefix caching off: a 64-request scoring batch stalled with it on in one CPU run (cause not isolated).
    return EngineConfig(
        model=model,
        max_model_len=args.max_model_len,
        kv_cache_gib=1,
        seed=args.seed,
        enable_prefix_caching=False,
        enforce_eager=args.enforce_eager,
    )


def eval_config(args: argparse.Namespace, output: Path, label: str) -> evaluate.EvalConfig:
    """Held-out eval settings (the JSON report labels the model with `label`)."""
    return evaluate.EvalConfig(
        output=output,
        n=args.n,
        temperature=args.temperature,
        max_tokens=args.eval_max_tokens,
        engine=EngineConfig(model=label),
    )


async def raw_records(
    args: argparse.Namespace,
    rec: Recorder,
    engine: Engine,
    grader: Grader,
    train: Path,
    fields: FieldMap = GSM8K_FIELDS,
) -> Path:
    """The raw slice as expert-stage records: the pipeline with k = 0 and no guided attempts, on the base model."""
    from services.pipeline import rewrite_batch

    raw: Path = args.out / "raw.jsonl"
    with rec.phase("raw records (expert stage only)"):
        problems = read_problems(train, fields).problems
        outcomes = await rewrite_batch(problems, engine, grader, StageParams(k=0, resolve_attempts=0))
        atomic_write_jsonl(raw, [ex for o in outcomes for ex in o.examples])
    return raw


async def base_phase(
    args: argparse.Namespace,
    rec: Recorder,
    engine: Engine,
    grader: Grader,
    data: dict[str, Path],
    heldout: evaluate.EvalSet,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gap report raw vs rewritten under the base model, and the base model's held-out accuracy."""
    gap_rep = await gap_phase(args, rec, engine, data)
    with rec.phase("eval base"):
        cfg = eval_config(args, args.out / "eval" / "base.json", "base")
        base = await evaluate.run_eval(cfg, [heldout], engine, grader)
    return gap_rep, base


async def gap_phase(args: argparse.Namespace, rec: Recorder, engine: Engine, data: dict[str, Path]) -> dict[str, Any]:
    """Policy gap of each record file under the engine's (base) model: every completion scored on its training
    prompt (records carry no target log-probs unless the rewrite ran with `--score`). Writes `gap/`."""
    with rec.phase("gap report raw vs rewritten"):
        groups = []
        sections = []
        for name, path in data.items():
            seqs = await gap.score_records(engine, gap.load_records(path))
            groups.append((name, seqs))
            sections.append(gap.dataset_report(name, path, "records", seqs))
        gap_rep = gap.gap_report(args.model, sections, rescored=True)
        gap.write_outputs(gap_rep, groups, args.out / "gap")
    return gap_rep


def train_run(args: argparse.Namespace, rec: Recorder, run: Run, data: dict[str, Path], resume: bool) -> Path:
    """`mindgap train` for one run with the shared step budget (or, with `resume`, its READY checkpoint)."""
    precision = args.precision or ("bf16" if _cuda() else "fp32")
    run_dir = args.out / "train" / run.name
    n_examples = sum(1 for line in data[run.data].read_text().splitlines() if line.strip())
    epochs = max(1, math.ceil(args.steps * args.batch_size / n_examples))  # the step budget decides
    if not (resume and any((run_dir / "checkpoints").glob("v*/READY"))):
        shutil.rmtree(run_dir, ignore_errors=True)  # stale checkpoints and appended metrics of older runs
        run_dir.mkdir(parents=True)
        is_options = ("--is-level", "token") if run.loss == "is" else ()
        with rec.phase(f"train {run.name}"):
            rec.mindgap(
                "train", "--source", data[run.data], "--model", args.model, "--loss", run.loss, *is_options,
                "--max-steps", args.steps, "--batch-size", args.batch_size, "--epochs", epochs,
                "--lr", args.lr, "--warmup-steps", args.warmup_steps, "--precision", precision,
                "--seed", args.seed if run.seed is None else run.seed, "--checkpoint-dir", run_dir / "checkpoints",
                "--checkpoint-every", args.steps, "--keep-checkpoints", 1, "--no-resume",
                "--metrics-jsonl", run_dir / "metrics.jsonl", "--tensorboard-dir", run_dir / "tb",
                "--max-seq-len", args.max_model_len,
            )  # fmt: skip
    return final_checkpoint(run_dir / "checkpoints")


def train_runs(args: argparse.Namespace, rec: Recorder, runs: list[Run], data: dict[str, Path]) -> dict[str, Path]:
    """`mindgap train` for every run with the same step budget; the final checkpoint of each."""
    return {run.name: train_run(args, rec, run, data, args.resume) for run in runs}


async def finetuned_phase(
    args: argparse.Namespace,
    rec: Recorder,
    engine: Engine,
    grader: Grader,
    checkpoints: dict[str, Path],
    data: dict[str, Path],
    heldout: evaluate.EvalSet,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    """Reload each fine-tune's weights: held-out accuracy and its NLL on both training sets."""
    evals: dict[str, dict[str, Any]] = {}
    nll: dict[str, dict[str, float]] = {}
    records = {name: gap.load_records(path) for name, path in data.items()}
    for name, checkpoint in checkpoints.items():
        with rec.phase(f"eval {name}"):
            await engine.reload(str(checkpoint))
            cfg = eval_config(args, args.out / "eval" / f"{name}.json", name)
            evals[name] = await evaluate.run_eval(cfg, [heldout], engine, grader)
            nll[name] = {}
            for data_name, recs in records.items() if args.train_nll else ():
                seqs = await gap.score_records(engine, recs)
                nll[name][data_name] = gap.summarise(seqs)["tokens"]["mean_nll"]
    return evals, nll


async def engine_phases(
    args: argparse.Namespace, rec: Recorder, runs: list[Run], train: Path, rewritten: Path, heldout: evaluate.EvalSet
) -> dict[str, Any]:
    """Everything after the rewrite, on ONE in-process engine; the fine-tunes train meanwhile.

    Engine start-up (compilation) dominates small runs on a CPU, so the base weights are served first
    and every fine-tune's checkpoint is then swapped in with `reload`. The trainer runs in subprocesses
    as soon as both record files exist, alongside the gap report and the base model's evaluation.
    """
    from services.vllm_engine import VLLMEngine
    from shared.grading import Grader

    data = {"raw": args.out / "raw.jsonl", "rewritten": rewritten}
    gap_json, base_json = args.out / "gap" / "gap.json", args.out / "eval" / "base.json"

    def start_training() -> asyncio.Future[dict[str, Path]]:
        # run_in_executor starts the thread at once (to_thread would wait for the loop, which the
        # engine's synchronous start-up blocks).
        return asyncio.get_running_loop().run_in_executor(None, train_runs, args, rec, runs, data)

    training = start_training() if args.resume and data["raw"].is_file() else None
    engine = await VLLMEngine.create(engine_config(args, args.model))
    grader = Grader()
    try:
        if training is None:
            await raw_records(args, rec, engine, grader, train)
            training = start_training()
        if args.resume and gap_json.is_file() and base_json.is_file():
            gap_rep, base = json.loads(gap_json.read_text()), json.loads(base_json.read_text())
        else:
            gap_rep, base = await base_phase(args, rec, engine, grader, data, heldout)
        checkpoints = await training
        evals, nll = await finetuned_phase(args, rec, engine, grader, checkpoints, data, heldout)
    finally:
        grader.close()
        await engine.shutdown()
    return {"base": base, "finetuned": evals, "train_nll": nll, "gap": gap_rep}


# --------------------------------------------------------------------------------------------- output


def plot_training(metrics: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Loss, grad norm and IS-weight spread (mean, max, ESS where logged) per step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    # One colour per arm, one line style per training seed ("<arm>-s<seed>"), so a dozen runs stay apart.
    arms: dict[str, str] = {}
    for name, rows in metrics.items():
        arm, _, seed = name.rpartition("-s")
        arm, seed = (arm, seed) if seed.isdigit() else (name, "0")
        color = arms.setdefault(arm, f"C{len(arms) % 10}")
        style = {"color": color, "linestyle": ("-", "--", "-.")[int(seed) % 3]}
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=name, **style)
        axes[1].plot(steps, [r["grad_norm"] for r in rows], label=name, **style)
        ess = [(r["step"], r["is_ess"], r["is_weight_max"]) for r in rows if _finite([r.get("is_weight_max")])]
        if ess:
            axes[2].plot([s for s, _, _ in ess], [e for _, e, _ in ess], label=f"{name} ESS", **style)
            axes[2].plot(
                [s for s, _, _ in ess], [m for _, _, m in ess], label=f"{name} max w", color=color, linestyle=":"
            )
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="grad norm (before clipping)", xlabel="step")
    axes[2].set(title="IS weights: ESS and max (is runs)", xlabel="step")
    if not axes[2].lines:
        axes[2].text(0.5, 0.5, "no IS run (--is-run):\nSFT/DFT log no importance weights", ha="center", va="center")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nll(row: dict[str, float], name: str) -> str:
    return f"{row[name]:.3f}" if name in row else "–"


def results_markdown(
    args: argparse.Namespace,
    out: dict[str, Any],
    metrics: dict[str, list[dict[str, Any]]],
    summary: dict[str, Any],
    timings: dict[str, float],
) -> str:
    """The results page: setup, accuracy table, gap table, rewrite stages, timings."""
    n = args.n
    base, evals, nll, gap_rep = out["base"], out["finetuned"], out["train_nll"], out["gap"]

    def acc(rep: dict[str, Any]) -> list[str]:
        b = next(iter(rep["benchmarks"].values()))
        return [f"{100 * b[m]['avg_at_n']:.1f}" for m in ("qwen", "math_verify")] + [
            f"{100 * b['qwen']['pass_at_k'][str(n)]:.1f}",
            f"{100 * b['truncated_share']:.0f}",
        ]

    base_nll = {d["name"]: d["all"]["tokens"]["mean_nll"] for d in gap_rep["datasets"]}
    lines = [
        f"Model `{args.model}`; GSM8K train slice of {args.train_size} problems, disjoint held-out slice of "
        f"{args.eval_size}; each fine-tune {args.steps} steps × {args.batch_size} examples, lr {args.lr}. "
        f"Held-out: n = {n} samples at temperature {args.temperature}, max {args.eval_max_tokens} tokens.",
        "",
        f"| model | train data | loss | avg@{n} (Qwen-Math) | avg@{n} (math-verify) | pass@{n} | truncated % "
        "| final train NLL | NLL raw | NLL rewritten |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| base | – | – | {' | '.join(acc(base))} | – | {base_nll['raw']:.3f} | {base_nll['rewritten']:.3f} |",
    ]
    for name, rep in evals.items():
        loss, data = name.split("-", 1)
        tail = _finite([r["nll"] for r in metrics.get(name, [])][-5:])
        final = f"{sum(tail) / len(tail):.3f}" if tail else "–"
        lines.append(
            f"| {name} | {data} | {loss} | {' | '.join(acc(rep))} | {final} "
            f"| {_nll(nll[name], 'raw')} | {_nll(nll[name], 'rewritten')} |"
        )
    stages = summary.get("stages", {})
    stage_text = ", ".join(f"{s} {v.get('problems', 0)}" for s, v in stages.items())
    lines += [
        "",
        "NLL columns: mean token NLL of each training set (raw expert solutions / rewritten records) under the "
        "model, on the training prompt. Final train NLL: the trainer's unweighted token NLL, mean of the last 5 "
        "logged steps (comparable across losses, unlike DFT's p-weighted loss).",
        "",
        f"Rewrite of the training slice: problems per stage — {stage_text}.",
        "",
        "### Policy gap of the training data under the base model",
        "",
        gap.markdown(gap_rep),
        "### Wall-clock (s)",
        "",
        "| phase | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.0f} |" for k, v in timings.items()],
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Run the whole reproduction."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    rec = Recorder(args.out)
    if not args.resume:
        (args.out / "commands.txt").unlink(missing_ok=True)
    src = args.data or data_dir() / "gsm8k" / "train.jsonl"
    if not src.is_file():
        raise SystemExit(f"GSM8K training file not found at {src} (pass --data or set MINDGAP_DATA_DIR)")
    train, heldout_path = slice_gsm8k(src, args.out, args.train_size, args.eval_size, args.seed)
    heldout = evaluate.load_eval_set("gsm8k_heldout", heldout_path, GSM8K_FIELDS)

    rewritten = args.out / "rewritten.jsonl"
    summary = rewrite(args, rec, train, rewritten, args.resume)

    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    runs = [Run(d, loss) for loss in losses for d in ("raw", "rewritten")] + (
        [Run("rewritten", "is")] if args.is_run else []
    )
    out = asyncio.run(engine_phases(args, rec, runs, train, rewritten, heldout))
    metrics = {run.name: read_metrics(args.out / "train" / run.name / "metrics.jsonl") for run in runs}
    plot_training(metrics, args.out / "training.png")
    md = results_markdown(args, out, metrics, summary, rec.timings)
    atomic_write_text(args.out / "results.md", md)
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **out,
        "rewrite_summary": summary,
        "timings": rec.timings,
        "commands": (args.out / "commands.txt").read_text().splitlines(),
    }
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    print(md)
    sys.stdout.flush()
    os._exit(0)  # the vLLM CPU engine can abort in interpreter teardown after all work is written


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    main()
