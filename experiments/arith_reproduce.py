"""CPU-scale reproduction of *Mind the Gap* on generated arithmetic word problems (issue 17).

    python experiments/arith_reproduce.py --out runs/arith                 # the full run: docs/results.md
    python experiments/arith_reproduce.py --out runs/calib --calibrate easy,medium,hard   # base model only
    python experiments/arith_reproduce.py --out runs/arith --report        # rebuild the page from what exists
    python experiments/arith_reproduce.py --out /tmp/toy --toy --model PATH   # minutes, for the test suite

SmolLM2-135M solves no GSM8K problem but part of short arithmetic stories (experiments/arith_problems.py),
so here all three rewrite stages occur and accuracy can move both ways. Steps (all artefacts in `--out`):
  1. data/: the training problems, the disjoint in-domain held-out set, the retention set
     (largest of three numbers: untrained, mostly solved by the base model) and a GSM8K slice (transfer);
  2. `mindgap rewrite` of the training problems (self → guided → expert; reference solutions terse);
  3. one in-process engine on the base model: raw records (every problem at its expert solution), the gap
     report raw vs rewritten, the base model's avg@n on the three held-out sets, and the KL probe (base
     samples on held-out prompts, scored by the base);
  4. arm by arm (seeds outer, arms inner): `mindgap train` from the base model with the same steps × batch
     × lr, reload the engine on the checkpoint, avg@n on the three sets, KL(base ‖ fine-tune) on the probe
     and the NLL of held-out reference solutions; `arms/<arm>.json` is written last, so an interrupted run
     started again with the same command skips every finished arm (and reuses the rewrite, the data and the
     base phase); the results page is rebuilt after every arm;
  5. results.{md,json}, accuracy.png (avg@n with 95 % bootstrap CIs), training.png (loss, grad norm, IS ESS
     per step), gap/ (the policy gap of the training data), commands.txt, machine and wall time.

The page leaves the reading of the numbers to whoever ran it (docs/results.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # reproduce.py and arith_problems.py beside it; the repository

import arith_problems as arith  # noqa: E402
import reproduce  # noqa: E402
from reproduce import GSM8K_FIELDS, Recorder, Run, read_metrics  # noqa: E402

from mindgap.evaluation import accuracy as evaluate  # noqa: E402
from mindgap.evaluation import estimators as stats  # noqa: E402
from mindgap.evaluation import gap  # noqa: E402
from mindgap.evaluation.benchmarks import data_dir  # noqa: E402
from shared.dataio import FieldMap, atomic_write_jsonl, atomic_write_text  # noqa: E402
from trainer.checkpoint import STATE_FILE  # noqa: E402

if TYPE_CHECKING:
    from services.engine import Engine
    from shared.grading import Grader

ARITH_FIELDS = FieldMap(question="question", solution="solution", answer="answer")
RETENTION_FIELDS = FieldMap(question="question", answer="answer")  # no reference solution
SETS = ("arith_heldout", "retention", "gsm8k_heldout")  # evaluation sets, in table order
ARMS = "sft-raw,dft-raw,sft-rewritten,dft-rewritten,is-rewritten"
# (left, right) of the paired differences reported: DR − raw per loss first
COMPARISONS = (
    ("sft-rewritten", "sft-raw"),
    ("dft-rewritten", "dft-raw"),
    ("dft-rewritten", "sft-rewritten"),
    ("is-rewritten", "dft-rewritten"),
)
# calibration problems per set: data-seed + offset (fixed, so a setting added later leaves the others alone)
CALIBRATION_SEED_OFFSETS = {"easy": 10, "medium": 11, "hard": 12, "retention": 13, "starter": 14}
METHOD = "qwen"  # the grading the tables use (math-verify is in each eval report)
TOY = {
    "train_size": 4, "heldout_size": 4, "retention_size": 2, "gsm8k_size": 2, "steps": 2, "batch_size": 2,
    "n": 2, "max_tokens": 32, "k": 2, "resolve_attempts": 1, "eval_max_tokens": 32, "max_model_len": 1024,
    "kl_prompts": 2, "enforce_eager": True, "calib_size": 3,
}  # fmt: skip
# settings an existing --out must have been made with (the others may change between invocations)
FREE_SETTINGS = {"out", "arms", "seeds", "keep_weights", "report", "calibrate", "calib_size", "toy"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; `--toy` overrides the sizes (not the arms or seeds) with a few-minute setting."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    reproduce.add_shared_options(p)
    p.add_argument("--difficulty", default="starter", choices=sorted(arith.DIFFICULTIES), help="problem setting")
    p.add_argument(
        "--data-seed", type=int, default=17, help="problem generator seed (train; +1 held-out, +2 retention)"
    )
    p.add_argument("--train-size", type=int, default=256, help="training problems")
    p.add_argument("--heldout-size", type=int, default=400, help="in-domain held-out problems (none in training)")
    p.add_argument("--retention-size", type=int, default=100, help="largest-of-three retention questions")
    p.add_argument("--gsm8k-size", type=int, default=50, help="GSM8K problems for the transfer check (0 = none)")
    p.add_argument("--gsm8k", type=Path, default=None, help="GSM8K train.jsonl (default: <data dir>/gsm8k/)")
    p.add_argument("--arms", default=ARMS, help="<loss>-<raw|rewritten> fine-tunes, comma-separated")
    p.add_argument(
        "--seeds",
        default="0",
        help="training seeds per arm, comma-separated (add one later: same command, --seeds 0,1)",
    )
    p.add_argument("--kl-prompts", type=int, default=64, help="held-out prompts per set in the KL/NLL probe")
    p.add_argument("--keep-weights", action="store_true", help="keep each arm's checkpoint after its evaluation")
    p.add_argument("--report", action="store_true", help="only rebuild results.{md,json} and plots from --out")
    p.add_argument(
        "--calibrate", default=None, help="sets to measure the base model on, in order, e.g. medium,retention,easy"
    )
    p.add_argument("--calib-size", type=int, default=100, help="problems per difficulty (and retention) to calibrate")
    p.add_argument("--toy", action="store_true", help="tiny sizes for an end-to-end check in minutes")
    # Evaluation at temperature 0.6: at 1 the base model's answers are mostly incoherent (calibration.md).
    p.set_defaults(
        steps=48, batch_size=8, lr=2e-5, max_tokens=200, eval_max_tokens=200, max_model_len=1024, temperature=0.6
    )
    args = p.parse_args(argv)
    if args.toy:
        for key, value in TOY.items():
            setattr(args, key, value)
    return args


def parse_runs(arms: str, seeds: str) -> list[Run]:
    """Every (seed, arm) fine-tune, seeds outer: after the first seed every arm has a result."""
    runs = []
    for seed in (int(s) for s in seeds.split(",") if s.strip()):
        for arm in (a.strip() for a in arms.split(",") if a.strip()):
            loss, _, data = arm.partition("-")
            if loss not in ("sft", "dft", "is") or data not in ("raw", "rewritten"):
                raise SystemExit(f"--arms: {arm!r} is not <sft|dft|is>-<raw|rewritten>")
            runs.append(Run(data, loss, seed))
    if not runs:
        raise SystemExit("--arms and --seeds name no fine-tune")
    return runs


def arm_of(name: str) -> str:
    """`dft-rewritten-s1` → `dft-rewritten`."""
    return name.rsplit("-s", 1)[0]


# ---------------------------------------------------------------------------------------------- data


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that fix the data, the rewrite, the training budget and the evaluation."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in FREE_SETTINGS}


def check_settings(args: argparse.Namespace) -> None:
    """Remember the settings in `--out`; refuse to continue a run made with other settings."""
    path = args.out / "settings.json"
    now = settings(args)
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
        if changed:
            raise SystemExit(
                f"{args.out} was made with other settings ({', '.join(changed)}): use the same options or a new --out"
            )
    else:
        atomic_write_text(path, json.dumps(now, indent=2) + "\n")


def write_data(args: argparse.Namespace) -> dict[str, Path]:
    """The four data files (deterministic in the seeds, so a resumed run rewrites them identically)."""
    folder = args.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    difficulty = arith.DIFFICULTIES[args.difficulty]
    train, heldout = arith.split_sets(
        args.train_size, args.heldout_size, difficulty, args.data_seed, args.data_seed + 1
    )
    paths = {"train": folder / "train.jsonl", "arith_heldout": folder / "arith_heldout.jsonl"}
    atomic_write_jsonl(paths["train"], train)
    atomic_write_jsonl(paths["arith_heldout"], heldout)
    paths["retention"] = folder / "retention.jsonl"
    atomic_write_jsonl(paths["retention"], arith.retention(args.retention_size, args.data_seed + 2))
    if args.gsm8k_size > 0:
        src = args.gsm8k or data_dir() / "gsm8k" / "train.jsonl"
        if not src.is_file():
            raise SystemExit(f"GSM8K file not found at {src} (pass --gsm8k, set MINDGAP_DATA_DIR or --gsm8k-size 0)")
        _, paths["gsm8k_heldout"] = reproduce.slice_gsm8k(src, folder / "gsm8k", 0, args.gsm8k_size, args.data_seed)
    return paths


def eval_sets(paths: dict[str, Path]) -> list[evaluate.EvalSet]:
    """The held-out sets present, in table order."""
    fields = {"arith_heldout": ARITH_FIELDS, "retention": RETENTION_FIELDS, "gsm8k_heldout": GSM8K_FIELDS}
    return [evaluate.load_eval_set(name, paths[name], fields[name]) for name in SETS if name in paths]


# --------------------------------------------------------------------------------------- evaluation


def scores_from_samples(path: Path) -> dict[str, dict[str, Any]]:
    """Per set: problem ids and per-problem share of correct samples under each grading."""
    out: dict[str, dict[str, Any]] = {}
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows.setdefault((row["benchmark"], row["problem_id"]), []).append(row)
    for (bench, pid), samples in rows.items():  # insertion order: the eval's problem order
        entry = out.setdefault(bench, {"ids": [], **{m: [] for m in evaluate.METHODS}})
        entry["ids"].append(pid)
        for m in evaluate.METHODS:
            entry[m].append(stats.problem_scores([[s["correct"][m] for s in samples]])[0])
    return out


async def evaluate_model(
    args: argparse.Namespace, engine: Engine, grader: Grader, label: str, sets: list[evaluate.EvalSet]
) -> dict[str, Any]:
    """avg@n on every held-out set: the eval report (eval/<label>.json) and per-problem scores."""
    samples = args.out / "eval" / "samples" / f"{label}.jsonl"
    cfg = reproduce.eval_config(args, args.out / "eval" / f"{label}.json", label)
    cfg = cfg.model_copy(update={"samples_output": samples})
    rep = await evaluate.run_eval(cfg, sets, engine, grader)
    return {"report": rep, "scores": scores_from_samples(samples)}


async def make_probe(args: argparse.Namespace, engine: Engine, sets: list[evaluate.EvalSet]) -> list[dict[str, Any]]:
    """The KL probe: one base-model sample (temperature 1) per held-out prompt, and each set's reference solutions.

    Prompts: the first `--kl-prompts` problems of the in-domain and retention sets. `kind` "sample" rows
    measure KL(base ‖ model) (the base's own samples), "reference" rows the NLL of the terse reference
    solution (how far a run moved towards the expert style).
    """
    from services.engine import SamplingConfig
    from shared.prompts import solve_messages

    sampling = SamplingConfig(n=1, temperature=1.0, top_p=1.0, max_tokens=args.eval_max_tokens)
    chosen = [(s.name, p) for s in sets if s.name != "gsm8k_heldout" for p in s.problems[: args.kl_prompts]]
    prompts = [engine.render_prompt(solve_messages(p.question)) for _, p in chosen]
    # all at once, so the engine batches them
    drawn = await asyncio.gather(*(engine.generate(prompt, sampling) for prompt in prompts))
    rows: list[dict[str, Any]] = []
    for (name, p), prompt, (sample,) in zip(chosen, prompts, drawn, strict=True):
        if sample.token_ids:  # nothing to score in an empty response
            rows.append({"set": name, "kind": "sample", "prompt": prompt, "completion": sample.token_ids})
        if p.solution:
            completion = engine.encode_completion(p.solution)
            rows.append({"set": name, "kind": "reference", "prompt": prompt, "completion": completion})
    return rows


async def probe_logprobs(engine: Engine, probe: list[dict[str, Any]]) -> list[list[float]]:
    """Every probe completion's token log-probs under the engine's current weights."""
    return list(await asyncio.gather(*(engine.score(r["prompt"], r["completion"]) for r in probe)))


def probe_shift(probe: list[dict[str, Any]], base: list[list[float]], model: list[list[float]]) -> dict[str, Any]:
    """Per set: KL(base ‖ model) per token on base samples, and the reference solutions' NLL under the model."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["set"] for r in probe):
        pick = [i for i, r in enumerate(probe) if r["set"] == name and r["kind"] == "sample"]
        refs = [model[i] for i, r in enumerate(probe) if r["set"] == name and r["kind"] == "reference"]
        out[name] = {"kl_from_base": stats.sampled_kl([base[i] for i in pick], [model[i] for i in pick])}
        if refs:
            out[name]["reference_nll"] = stats.token_stats(refs).mean_nll
    return out


def answer_shapes(out: Path, labels: list[str]) -> dict[str, dict[str, float]]:
    """What each model's in-domain answers look like, from its samples.

    `worked_out`: the share of samples that work the gold answer out somewhere (an equation or expression
    giving it; `services.guidance_filter.worked_out`), whatever the grader then extracts as the final
    answer: how much of the arithmetic a model learned, apart from whether it stops after it (`correct`:
    the graded share, the seed's avg@n). `terse`: the share in the references' own format (a `####`
    line); `truncated`: cut at max tokens.
    """
    from services.guidance_filter import worked_out

    path = out / "data" / "arith_heldout.jsonl"
    if not path.is_file():
        return {}
    questions = {p.id: p.question for p in evaluate.load_eval_set("arith_heldout", path, ARITH_FIELDS).problems}
    shapes: dict[str, dict[str, float]] = {}
    for label in labels:
        samples = out / "eval" / "samples" / f"{label}.jsonl"
        rows = [json.loads(line) for line in samples.read_text().splitlines()] if samples.is_file() else []
        rows = [r for r in rows if r["benchmark"] == "arith_heldout"]
        if rows:
            shapes[label] = {
                "correct": statistics.fmean(r["correct"][METHOD] for r in rows),  # avg@n: n samples per problem
                "worked_out": statistics.fmean(
                    worked_out(r["response"], questions[r["problem_id"]], str(r["gold"])) for r in rows
                ),
                "terse": statistics.fmean("####" in r["response"] for r in rows),
                "truncated": statistics.fmean(r["finish_reason"] == "length" for r in rows),
                "mean_tokens": statistics.fmean(r["tokens"] for r in rows),
            }
    return shapes


def training_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's training curve in numbers: final loss/NLL, grad-norm mean and variance, IS weights."""
    if not rows:
        return {}

    def col(key: str) -> list[float]:
        return reproduce._finite([r.get(key) for r in rows])

    tail = rows[-5:]
    grad = col("grad_norm")
    is_rows = [r for r in rows if reproduce._finite([r.get("is_weight_max")])]  # steps that had IS weights
    ess = reproduce._finite([r.get("is_ess") for r in is_rows])
    clip = reproduce._finite([r.get("is_clip_frac") for r in is_rows])
    return {
        "steps": len(rows),
        "final_loss": statistics.fmean(reproduce._finite([r.get("loss") for r in tail]) or [float("nan")]),
        "final_nll": statistics.fmean(reproduce._finite([r.get("nll") for r in tail]) or [float("nan")]),
        "grad_norm_mean": statistics.fmean(grad) if grad else None,
        "grad_norm_var": statistics.pvariance(grad) if len(grad) > 1 else None,
        "is_ess_mean": statistics.fmean(ess) if ess else None,
        "is_clip_frac_mean": statistics.fmean(clip) if clip else None,
        "stages": rows[-1].get("stages", {}),
    }


# ------------------------------------------------------------------------------------------- phases


@dataclass
class Context:
    """What every phase needs."""

    args: argparse.Namespace
    rec: Recorder
    paths: dict[str, Path]
    sets: list[evaluate.EvalSet]


async def base_phase(ctx: Context, engine: Engine, grader: Grader, data: dict[str, Path]) -> dict[str, Any]:
    """Raw records, the gap report, the base model's accuracy and the KL probe (each reused when present)."""
    out = ctx.args.out
    if not data["raw"].is_file():
        await reproduce.raw_records(ctx.args, ctx.rec, engine, grader, ctx.paths["train"], ARITH_FIELDS)
    base_file = out / "arms" / "base.json"
    if base_file.is_file():
        base: dict[str, Any] = json.loads(base_file.read_text())
        return base
    gap_rep = await reproduce.gap_phase(ctx.args, ctx.rec, engine, data)
    with ctx.rec.phase("eval base"):
        result = await evaluate_model(ctx.args, engine, grader, "base", ctx.sets)
    with ctx.rec.phase("KL probe (base samples)"):
        probe = await make_probe(ctx.args, engine, ctx.sets)
        base_lp = await probe_logprobs(engine, probe)
        atomic_write_jsonl(
            out / "probe.jsonl", [r | {"base_logprobs": lp} for r, lp in zip(probe, base_lp, strict=True)]
        )
    base = {"name": "base", **result, "shift": probe_shift(probe, base_lp, base_lp), "gap": gap_rep}
    base["seconds"] = dict(ctx.rec.timings)
    atomic_write_text(base_file, json.dumps(base, indent=2) + "\n")
    return base


async def arm_phase(ctx: Context, engine: Engine, grader: Grader, run: Run, data: dict[str, Path]) -> None:
    """Train one arm (or reuse its READY checkpoint), evaluate it, write arms/<name>.json, drop its weights."""
    args = ctx.args
    start = time.monotonic()
    loop = asyncio.get_running_loop()
    # A thread, so the engine's event loop keeps running while the trainer subprocess works.
    checkpoint = await loop.run_in_executor(None, reproduce.train_run, args, ctx.rec, run, data, True)
    trained = time.monotonic()
    with ctx.rec.phase(f"eval {run.name}"):
        await engine.reload(str(checkpoint))
        result = await evaluate_model(args, engine, grader, run.name, ctx.sets)
        probe = [json.loads(line) for line in (args.out / "probe.jsonl").read_text().splitlines()]
        model_lp = await probe_logprobs(engine, probe)
    metrics = read_metrics(args.out / "train" / run.name / "metrics.jsonl")
    arm = {
        "name": run.name,
        "arm": arm_of(run.name),
        "loss": run.loss,
        "data": run.data,
        "seed": run.seed,
        # the order the trainer read the data in, from its own state (arms trained before the trainer
        # shuffled carry no such key: they read file order)
        "order": json.loads((checkpoint / STATE_FILE).read_text())["source"]["order"],
        **result,
        "shift": probe_shift(probe, [r["base_logprobs"] for r in probe], model_lp),
        "training": training_summary(metrics),
        "seconds": {"train": round(trained - start, 1), "eval": round(time.monotonic() - trained, 1)},
    }
    atomic_write_text(args.out / "arms" / f"{run.name}.json", json.dumps(arm, indent=2) + "\n")
    if not args.keep_weights:
        shutil.rmtree(args.out / "train" / run.name / "checkpoints", ignore_errors=True)


async def engine_phases(ctx: Context, runs: list[Run], data: dict[str, Path]) -> None:
    """The base phase, then every unfinished arm, on ONE engine whose weights are swapped per arm."""
    from services.vllm_engine import VLLMEngine
    from shared.grading import Grader

    with ctx.rec.phase("engine start"):
        engine = await VLLMEngine.create(reproduce.engine_config(ctx.args, ctx.args.model))
    grader = Grader()
    try:
        await base_phase(ctx, engine, grader, data)
        write_report(ctx.args, ctx.rec)
        for run in runs:
            if (ctx.args.out / "arms" / f"{run.name}.json").is_file():
                print(f"=== {run.name}: done before, skipped", file=sys.stderr, flush=True)
                continue
            await arm_phase(ctx, engine, grader, run, data)
            write_report(ctx.args, ctx.rec)
    finally:
        grader.close()
        await engine.shutdown()


# -------------------------------------------------------------------------------------------- report


def load_arms(out: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The base result and every finished fine-tune (sorted by arm order, then seed)."""
    folder = out / "arms"
    base_file = folder / "base.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    order = {a: i for i, a in enumerate(ARMS.split(","))}
    runs = (
        [json.loads(p.read_text()) for p in folder.glob("*.json") if p.name != "base.json"] if folder.is_dir() else []
    )
    runs.sort(key=lambda r: (order.get(r["arm"], len(order)), r["arm"], r["seed"]))
    return base, runs


def arm_scores(runs: list[dict[str, Any]], arm: str, name: str, method: str = METHOD) -> list[float] | None:
    """Per-problem scores of one arm on one set, averaged over its seeds (None when the arm has no result)."""
    per_seed = [r["scores"][name][method] for r in runs if r["arm"] == arm and name in r["scores"]]
    return stats.mean_over_seeds(per_seed) if per_seed else None


def summarise(base: dict[str, Any], runs: list[dict[str, Any]], set_names: list[str]) -> dict[str, Any]:
    """The numbers of the page: avg@n with CIs per arm and set, paired differences, shifts, training curves."""
    arms = ["base", *dict.fromkeys(r["arm"] for r in runs)]

    def scores(arm: str, name: str) -> list[float] | None:
        if arm == "base":
            return base["scores"][name][METHOD] if name in base["scores"] else None
        return arm_scores(runs, arm, name)

    accuracy: dict[str, dict[str, Any]] = {}
    for arm in arms:
        accuracy[arm] = {}
        for name in set_names:
            s = scores(arm, name)
            if s is not None:
                seeds = [r for r in runs if r["arm"] == arm] if arm != "base" else [base]
                accuracy[arm][name] = {
                    "avg": stats.bootstrap_mean(s).to_json(),
                    "per_seed": [statistics.fmean(r["scores"][name][METHOD]) for r in seeds],
                    # which seed and data order each per_seed value is (none for the base model); arms
                    # trained before the trainer shuffled carry no order: they read file order
                    "seeds": [{"seed": r["seed"], "order": r.get("order", "file")} for r in seeds if r is not base],
                }
    pairs = [(a, b) for a, b in COMPARISONS if a in arms and b in arms] + [(a, "base") for a in arms[1:]]
    differences, per_seed = [], []
    for a, b in pairs:
        for name in set_names:
            sa, sb = scores(a, name), scores(b, name)
            if sa is not None and sb is not None:
                differences.append({"left": a, "right": b, "set": name, **stats.paired_difference(sa, sb).to_json()})
    # The same comparisons seed by seed (the seeds both arms have): the CIs above are over problems only,
    # so whether a difference holds from one training seed to the next shows here.
    by_seed = {(r["arm"], r["seed"]): r for r in runs}
    for a, b in (p for p in COMPARISONS if p[0] in arms and p[1] in arms):
        for seed in sorted({r["seed"] for r in runs if r["arm"] == a} & {r["seed"] for r in runs if r["arm"] == b}):
            ra, rb = by_seed[(a, seed)], by_seed[(b, seed)]
            for name in set_names:
                if name in ra["scores"] and name in rb["scores"]:
                    iv = stats.paired_difference(ra["scores"][name][METHOD], rb["scores"][name][METHOD])
                    per_seed.append({"left": a, "right": b, "seed": seed, "set": name, **iv.to_json()})
    shift: dict[str, dict[str, Any]] = {"base": base["shift"]}
    for arm in arms[1:]:
        rs = [r for r in runs if r["arm"] == arm]
        shift[arm] = {
            name: {key: statistics.fmean(r["shift"][name][key] for r in rs) for key in rs[0]["shift"][name]}
            for name in rs[0]["shift"]
        }
    return {"accuracy": accuracy, "differences": differences, "differences_per_seed": per_seed, "shift": shift}


def _ci(iv: dict[str, float], scale: float = 100.0, signed: bool = False) -> str:
    fmt = "+.1f" if signed else ".1f"
    return f"{scale * iv['value']:{fmt}} [{scale * iv['low']:{fmt}}, {scale * iv['high']:{fmt}}]"


def _num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) and x == x else "–"


def machine() -> dict[str, Any]:
    """The machine the run used: CPU model, cores, memory, load."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
    ]
    cpu = names[0] if cpuinfo.is_file() and names else platform.processor() or platform.machine()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "load_average": os.getloadavg()}


def results_markdown(
    args: argparse.Namespace,
    base: dict[str, Any],
    runs: list[dict[str, Any]],
    summary: dict[str, Any],
    extra: dict[str, Any],
) -> str:
    """The results page: setup, accuracy with CIs, paired differences, shift, training, gap, stages, timings."""
    n = args.n
    set_names = [s for s in SETS if s in base["scores"]]
    acc, shift = summary["accuracy"], summary["shift"]
    d = arith.DIFFICULTIES[args.difficulty]
    sizes = {name: len(base["scores"][name]["ids"]) for name in set_names}
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"Model `{args.model}`; {args.train_size} training problems ({args.difficulty}: `{d.label()}`), "
        f"held-out sets: {', '.join(f'{k} {v}' for k, v in sizes.items())} problems. Each fine-tune: "
        f"{args.steps} steps × {args.batch_size} examples, lr {args.lr}, warm-up {args.warmup_steps}, from the "
        f"base model; training seeds {', '.join(map(str, seeds)) or '–'}. Evaluation: n = {n} samples per problem "
        f"at temperature {args.temperature}, max {args.eval_max_tokens} tokens, graded with the Qwen-Math check.",
        "",
        f"### Accuracy: avg@{n} in % with 95 % bootstrap CIs over problems",
        "",
        "Arms with several seeds: per-problem scores averaged over seeds, then resampled by problem; the "
        "seeds' own avg@n in the last column, with the order the trainer read the training data in (`file`: "
        "file order every epoch; `shuffled:S`: a fresh order per epoch drawn from seed S).",
        "",
        "| model | " + " | ".join(set_names) + " | per seed (" + set_names[0] + ") |",
        "|---|" + "---:|" * len(set_names) + "---|",
    ]
    for arm, by_set in acc.items():
        cells = [_ci(by_set[name]["avg"]) if name in by_set else "–" for name in set_names]
        first = by_set.get(set_names[0], {})
        values = first.get("per_seed", [])
        tags = [f" (seed {t['seed']}, {t['order']})" for t in first.get("seeds", [])] or [""] * len(values)
        per_seed = ", ".join(f"{100 * x:.1f}{tag}" for x, tag in zip(values, tags, strict=True))
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {per_seed} |")
    shapes = extra.get("answer_shapes", {})
    if shapes:
        lines += [
            "",
            "### What the in-domain answers look like",
            "",
            "Share of samples that work the gold answer out somewhere (an equation or expression giving it), "
            "whatever the grader then takes as the final answer; in the references' terse format (a `####` "
            "line); cut at max tokens; mean tokens.",
            "",
            "| model | avg@n % | works the answer out % | terse % | truncated % | mean tokens |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, sh in shapes.items():
            lines.append(
                f"| {label} | {100 * sh['correct']:.1f} | {100 * sh['worked_out']:.1f} | {100 * sh['terse']:.1f} "
                f"| {100 * sh['truncated']:.1f} | {sh['mean_tokens']:.0f} |"
            )
    lines += [
        "",
        "### Paired differences (percentage points, 95 % paired bootstrap CI)",
        "",
        "| comparison | " + " | ".join(set_names) + " |",
        "|---|" + "---:|" * len(set_names) + "",
    ]
    by_pair: dict[tuple[str, str], dict[str, Any]] = {}
    for diff in summary["differences"]:
        by_pair.setdefault((diff["left"], diff["right"]), {})[diff["set"]] = diff
    for (a, b), pair in by_pair.items():
        row = [_ci(pair[name], signed=True) if name in pair else "–" for name in set_names]
        lines.append(f"| {a} − {b} | " + " | ".join(row) + " |")
    seeded: dict[tuple[str, str, int], dict[str, Any]] = {}
    for diff in summary["differences_per_seed"]:
        seeded.setdefault((diff["left"], diff["right"], diff["seed"]), {})[diff["set"]] = diff
    if len({seed for _, _, seed in seeded}) > 1:
        lines += [
            "",
            "Seed by seed (each seed's own paired difference; the intervals above are over problems only and do "
            "not include the variation between training seeds):",
            "",
            "| comparison | seed | " + " | ".join(set_names) + " |",
            "|---|---:|" + "---:|" * len(set_names),
        ]
        for (a, b, seed), pair in seeded.items():
            row = [_ci(pair[name], signed=True) if name in pair else "–" for name in set_names]
            lines.append(f"| {a} − {b} | {seed} | " + " | ".join(row) + " |")
    probe_sets = list(shift.get("base", {}))
    lines += [
        "",
        "### How far each run moved from the base model",
        "",
        f"KL(base ‖ model) per token on one base sample for each of the first {args.kl_prompts} prompts of a set "
        "(temperature 1; the base's own samples scored by both models), and the mean token NLL of those problems' "
        "terse reference solutions under the model (lower: closer to the expert style). Means over seeds.",
        "",
        "| model | " + " | ".join(f"KL {s} | ref NLL {s}" for s in probe_sets) + " |",
        "|---|" + "---:|---:|" * len(probe_sets),
    ]
    for arm, by_set in shift.items():
        cells = [
            f"{_num(by_set[s].get('kl_from_base'), 4)} | {_num(by_set[s].get('reference_nll'))}" for s in probe_sets
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Training (per run)",
        "",
        "Final loss / NLL: mean of the last 5 logged steps (NLL is the unweighted token NLL, comparable across "
        "losses); grad norm before clipping, mean and variance over steps; IS ESS: normalised effective sample "
        "size of the token weights per step (IS runs); curves in `training.png`.",
        "",
        "| run | steps | final loss | final NLL | grad norm mean | grad norm var | IS ESS mean | IS clip share "
        "| train s | eval s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        t = r["training"]
        lines.append(
            f"| {r['name']} | {t.get('steps', '–')} | {_num(t.get('final_loss'))} | {_num(t.get('final_nll'))} "
            f"| {_num(t.get('grad_norm_mean'))} | {_num(t.get('grad_norm_var'), 4)} | {_num(t.get('is_ess_mean'))} "
            f"| {_num(t.get('is_clip_frac_mean'))} | {r['seconds']['train']:.0f} | {r['seconds']['eval']:.0f} |"
        )
    rw = extra["rewrite_summary"]
    stages = rw.get("stages", {})
    rejections = {k: v for k, v in rw.items() if k.endswith("_rejected") and isinstance(v, int)}
    rejections |= {f"guidance: {k}": v for k, v in rw.get("guidance_rejected", {}).items()}
    lines += [
        "",
        "### Rewrite of the training problems",
        "",
        "| stage | problems | % |",
        "|---|---:|---:|",
        *[f"| {s} | {v.get('problems', 0)} | {v.get('percent_problems', 0):.1f} |" for s, v in stages.items()],
        "",
        "Responses rejected: " + (", ".join(f"{k} {v}" for k, v in rejections.items()) or "none") + ". "
        f"Generated {rw.get('generated_tokens', '–')} tokens in {rw.get('wall_seconds', '–')} s.",
        "",
        "### Policy gap of the training data under the base model",
        "",
        gap.markdown(base["gap"]),
        "### Run",
        "",
        f"Machine: {extra['machine']['cpu']}, {extra['machine']['cores']} cores, "
        f"{extra['machine']['memory_gib']} GiB; load average at the last write "
        f"{', '.join(f'{x:.1f}' for x in extra['machine']['load_average'])}.",
        "",
        "Commands, one per invocation (a resumed run skips every finished step and arm):",
        "",
        *[f"- `{command}`" for command in extra["commands"]],
        "",
        f"Wall time of the recorded phases: {sum(extra['timings'].values()) / 60:.0f} min "
        f"(phases of earlier invocations of a resumed run included).",
        "",
        "| phase | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.0f} |" for k, v in extra["timings"].items()],
    ]
    return "\n".join(lines) + "\n"


def plot_accuracy(summary: dict[str, Any], set_names: list[str], path: Path) -> None:
    """avg@n per model and set with 95 % CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary["accuracy"])
    fig, axes = plt.subplots(1, len(set_names), figsize=(5 * len(set_names), 4), squeeze=False)
    for ax, name in zip(axes[0], set_names, strict=True):
        vals = [summary["accuracy"][a].get(name, {}).get("avg") for a in arms]
        xs = [i for i, v in enumerate(vals) if v]
        ys = [100 * vals[i]["value"] for i in xs]
        err = [
            [100 * (vals[i]["value"] - vals[i]["low"]) for i in xs],
            [100 * (vals[i]["high"] - vals[i]["value"]) for i in xs],
        ]
        ax.bar(xs, ys, yerr=err, capsize=4, color=["grey" if arms[i] == "base" else "tab:blue" for i in xs])
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set(title=f"{name}: avg@n (%), 95% CI")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timings_log(out: Path, rec: Recorder) -> dict[str, float]:
    """Phase timings of every invocation so far (a resumed run adds its phases to the earlier ones)."""
    path = out / "timings.json"
    done: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    done |= rec.timings
    atomic_write_text(path, json.dumps(done, indent=2) + "\n")
    return done


def run_commands(args: argparse.Namespace) -> list[str]:
    """The commands that made the run, one per invocation (a resumed run adds seeds or arms): those recorded
    before, then this invocation's with the vLLM CPU variables it ran under (not a `--report`, which only
    rebuilds the page)."""
    recorded = args.out / "results.json"
    earlier: list[str] = []
    if recorded.is_file():
        previous = json.loads(recorded.read_text())
        earlier = previous.get("commands") or [previous["command"]]  # pages before 'commands' kept one
    if args.report:
        return earlier
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("VLLM_CPU_")]
    this = " ".join(
        [*(["env", *env] if env else []), ".venv/bin/python", "experiments/arith_reproduce.py", *sys.argv[1:]]
    )
    return earlier if earlier and earlier[-1] == this else [*earlier, this]


def write_report(args: argparse.Namespace, rec: Recorder) -> None:
    """results.{md,json}, accuracy.png and training.png from whatever arms have finished."""
    base, runs = load_arms(args.out)
    if base is None:
        return
    set_names = [s for s in SETS if s in base["scores"]]
    summary = summarise(base, runs, set_names)
    summary_path = args.out / "rewritten.jsonl.summary.json"
    extra = {
        "rewrite_summary": json.loads(summary_path.read_text()) if summary_path.is_file() else {},
        "machine": machine(),
        "commands": run_commands(args),
        "timings": timings_log(args.out, rec),
        "answer_shapes": answer_shapes(args.out, ["base", *(r["name"] for r in runs)]),
    }
    md = results_markdown(args, base, runs, summary, extra)
    atomic_write_text(args.out / "results.md", md)
    payload = {"settings": settings(args), **summary, **extra, "runs": [r["name"] for r in runs]}
    atomic_write_text(args.out / "results.json", json.dumps(payload, indent=2) + "\n")
    plot_accuracy(summary, set_names, args.out / "accuracy.png")
    metrics = {r["name"]: read_metrics(args.out / "train" / r["name"] / "metrics.jsonl") for r in runs}
    reproduce.plot_training(metrics, args.out / "training.png")


# --------------------------------------------------------------------------------------- calibration


async def calibrate(args: argparse.Namespace) -> None:
    """The base model's avg@n on `--calib-size` problems of each named set: calibration.{json,md}."""
    from services.vllm_engine import VLLMEngine
    from shared.grading import Grader

    names = [s.strip() for s in args.calibrate.split(",") if s.strip()]
    known = [*arith.DIFFICULTIES, "retention"]
    unknown = [s for s in names if s not in known]
    if unknown:
        raise SystemExit(f"--calibrate: unknown set {unknown}; known: {', '.join(known)}")
    folder = args.out / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    # Seeds apart from the run's (data-seed .. data-seed+2), so calibrating never looks at the held-out set;
    # measured in the order given (results are saved after each set).
    seeds = {name: args.data_seed + CALIBRATION_SEED_OFFSETS[name] for name in known}
    sets = {
        name: arith.retention(args.calib_size, seeds[name])
        if name == "retention"
        else arith.problems(args.calib_size, arith.DIFFICULTIES[name], seeds[name])
        for name in names
    }
    path = args.out / "calibration.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    start = time.monotonic()
    engine = await VLLMEngine.create(reproduce.engine_config(args, args.model))
    results["engine_start_s"] = round(time.monotonic() - start, 1)
    grader = Grader()
    try:
        for name, rows in sets.items():
            atomic_write_jsonl(folder / f"{name}.jsonl", rows)
            fields = RETENTION_FIELDS if name == "retention" else ARITH_FIELDS
            data = evaluate.load_eval_set(name, folder / f"{name}.jsonl", fields)
            t0 = time.monotonic()
            result = await evaluate_model(args, engine, grader, f"calibration-{name}", [data])
            seconds = time.monotonic() - t0
            b = result["report"]["benchmarks"][name]
            tokens = b["mean_response_tokens"] * args.n * b["problems"]
            # keyed by set and temperature: calibrating at another temperature adds rows
            results.setdefault("sets", {})[f"{name} T={args.temperature:g}"] = {
                "difficulty": arith.DIFFICULTIES[name].label() if name in arith.DIFFICULTIES else "largest_of_three",
                "problems": b["problems"],
                "n": args.n,
                "avg_at_n": stats.bootstrap_mean(result["scores"][name][METHOD]).to_json(),
                "avg_at_n_math_verify": b["math_verify"]["avg_at_n"],
                "pass_at_n": b[METHOD]["pass_at_k"][str(args.n)],
                "truncated_share": b["truncated_share"],
                "mean_response_tokens": b["mean_response_tokens"],
                "seconds": round(seconds, 1),
                "tokens_per_s": round(tokens / seconds, 1),
                "max_tokens": args.eval_max_tokens,
                "temperature": args.temperature,
                "load_average": os.getloadavg(),
            }
            atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    finally:
        grader.close()
        await engine.shutdown()
    atomic_write_text(args.out / "calibration.md", calibration_markdown(results))


def calibration_markdown(results: dict[str, Any]) -> str:
    """The calibration table."""
    lines = [
        "| set, temperature | setting | problems × n | avg@n % [95 % CI] | pass@n % | truncated % | mean tokens | s "
        "| tokens/s | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.get("sets", {}).items():
        lines.append(
            f"| {name} | `{r['difficulty']}` | {r['problems']} × {r['n']} | {_ci(r['avg_at_n'])} "
            f"| {100 * r['pass_at_n']:.1f} | {100 * r['truncated_share']:.0f} | {r['mean_response_tokens']:.0f} "
            f"| {r['seconds']:.0f} | {r['tokens_per_s']:.0f} | {r['load_average'][0]:.1f} |"
        )
    return "\n".join(lines) + f"\n\nEngine start: {results.get('engine_start_s', '–')} s.\n"


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Calibrate, rebuild the report, or run (and resume) the reproduction."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    rec = Recorder(args.out)
    if args.calibrate:
        asyncio.run(calibrate(args))
    elif args.report:
        write_report(args, rec)
    else:
        runs = parse_runs(args.arms, args.seeds)
        check_settings(args)
        paths = write_data(args)
        sets = eval_sets(paths)
        rewritten = args.out / "rewritten.jsonl"
        reproduce.rewrite(args, rec, paths["train"], rewritten, resume=True, fields=ARITH_FIELDS)
        data = {"raw": args.out / "raw.jsonl", "rewritten": rewritten}
        asyncio.run(engine_phases(Context(args, rec, paths, sets), runs, data))
        write_report(args, rec)
        print((args.out / "results.md").read_text())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the vLLM CPU engine can abort in interpreter teardown after all work is written


if __name__ == "__main__":
    main()
