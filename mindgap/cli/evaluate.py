"""`mindgap eval` (accuracy on benchmarks and data files) and `mindgap gap` (the policy-gap report)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from mindgap.cli import app, fail, hard_exit, setup_logging

if TYPE_CHECKING:
    from shared.config import MindgapSettings

log = logging.getLogger("mindgap.eval")

S = TypeVar("S", bound="MindgapSettings")


def _load(cls: type[S], config: Path | None, **overrides: Any) -> S:
    from pydantic import ValidationError

    try:
        cfg = cls.load(config, **overrides)
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise fail(f"invalid configuration: {problems}") from None
    cfg.log_resolved(log)
    return cfg


def _engine_opts(model: str | None, seed: int | None, max_model_len: int | None, dtype: str | None) -> dict[str, Any]:
    opts = {"model": model, "seed": seed, "max_model_len": max_model_len, "dtype": dtype}
    return {k: v for k, v in opts.items() if v is not None}


@app.command("eval")
def evaluate(
    model: str | None = typer.Option(None, help="HF id, local path or 'default' (SmolLM2-135M-Instruct)"),
    benchmarks: str | None = typer.Option(
        None, help="comma-separated: math500,minerva_math,olympiadbench,aime24,amc23 (from $MINDGAP_DATA_DIR)"
    ),
    data: list[Path] | None = typer.Option(None, "--data", help="a problems file to evaluate on (repeatable)"),
    fields: list[str] | None = typer.Option(
        None, help="field mapping for --data files, e.g. question=problem (repeatable)"
    ),
    subject_field: str | None = typer.Option(None, help="source field of --data files that labels the subject"),
    n: int | None = typer.Option(None, "--n", help="samples per problem (default 16)"),
    temperature: float | None = typer.Option(None, help="sampling temperature (default 1.0)"),
    top_p: float | None = typer.Option(None),
    max_tokens: int | None = typer.Option(None, help="response length cap (default 1024)"),
    limit: int | None = typer.Option(None, help="first N problems of each data set"),
    split: str | None = typer.Option(None, help="split of --data HF datasets folders and hub ids (default: train)"),
    output: Path = typer.Option(..., "-o", "--output", help="JSON report; the Markdown table goes beside it (.md)"),
    samples_output: Path | None = typer.Option(None, help="JSONL with every graded response"),
    seed: int | None = typer.Option(None, help="engine seed"),
    max_model_len: int | None = typer.Option(None),
    dtype: str | None = typer.Option(None),
    grader_workers: int | None = typer.Option(None, help="grading processes"),
    config: Path | None = typer.Option(None, "--config", help="TOML config file"),
    backend: str | None = typer.Option(None, help="inference engine: vllm (default) or fake (tests)"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Accuracy (avg@n, pass@n, per subject; math-verify and Qwen-Math grading) of a model on math benchmarks."""
    from mindgap.evaluation.accuracy import EvalConfig, load_sets, markdown, run_eval
    from mindgap.evaluation.benchmarks import BenchmarkError, parse_benchmark_names
    from shared.dataio import DataError

    setup_logging(verbose)
    try:
        names = parse_benchmark_names(benchmarks) if benchmarks else None
    except BenchmarkError as exc:
        raise fail(str(exc)) from None
    specs = [{"path": p, "fields": fields or [], "subject_field": subject_field} for p in data or []]
    cfg = _load(
        EvalConfig,
        config,
        output=output,
        benchmarks=names,
        data=specs or None,
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        limit=limit,
        split=split,
        samples_output=samples_output,
        grader_workers=grader_workers,
        backend=backend,
        engine=_engine_opts(model, seed, max_model_len, dtype) or None,
    )
    if not cfg.benchmarks and not cfg.data:
        raise fail("nothing to evaluate: give --benchmarks NAMES and/or --data FILE")
    from shared.dataio import is_hub_id

    for spec in cfg.data:
        if not spec.path.exists() and not is_hub_id(str(spec.path)):
            raise fail(f"data file not found: {spec.path}")
    try:
        sets = load_sets(cfg)
    except (BenchmarkError, DataError, OSError) as exc:
        raise fail(str(exc)) from None

    async def run() -> dict[str, Any]:
        from services.engine import create_engine

        eng = await create_engine(cfg.backend, cfg.engine)
        try:
            return await run_eval(cfg, sets, eng)
        finally:
            await eng.shutdown()

    rep = asyncio.run(run())
    typer.echo(markdown(rep))
    typer.echo(f"wrote {cfg.output} and {cfg.output.with_suffix('.md')}")
    if cfg.backend == "vllm":
        hard_exit(0)  # the vLLM CPU engine can abort in interpreter teardown


@app.command("gap")
def gap(
    inputs: list[Path] = typer.Argument(..., help="DATA [DATA2]: a problems file and/or a rewritten records file"),
    output_dir: Path = typer.Option(..., "-o", "--output-dir", help="folder for gap.json, gap.md and gap.png"),
    model: str | None = typer.Option(None, help="HF id, local path or 'default' (SmolLM2-135M-Instruct)"),
    fields: list[str] | None = typer.Option(None, help="field mapping for problems files (repeatable)"),
    labels: list[str] | None = typer.Option(None, help="a name per input, in order (default: file stems)"),
    limit: int | None = typer.Option(None, help="first N problems or records of each file"),
    split: str | None = typer.Option(None, help="split of HF datasets folders and hub ids (default: train)"),
    rescore: bool = typer.Option(
        True, "--rescore/--no-rescore", help="score records again (default) or reuse their stored target_logprobs"
    ),
    max_model_len: int | None = typer.Option(None),
    dtype: str | None = typer.Option(None),
    config: Path | None = typer.Option(None, "--config", help="TOML config file"),
    backend: str | None = typer.Option(None, help="inference engine: vllm (default) or fake (tests)"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """How off-policy a dataset is for a model: token log-probs, NLL, p<0.1 share, sequence weights and ESS."""
    from mindgap.evaluation.gap import GapConfig, markdown, run_gap
    from shared.dataio import DataError, is_hub_id

    setup_logging(verbose)
    for path in inputs:
        if not path.exists() and not is_hub_id(str(path)):
            raise fail(f"input file not found: {path}")
    cfg = _load(
        GapConfig,
        config,
        inputs=inputs,
        output_dir=output_dir,
        labels=labels or None,
        fields=fields or None,
        limit=limit,
        split=split,
        rescore=rescore,
        backend=backend,
        engine=_engine_opts(model, None, max_model_len, dtype) or None,
    )
    try:
        cfg.names()
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:
        rep = asyncio.run(run_gap(cfg))
    except DataError as exc:
        raise fail(str(exc)) from None
    typer.echo(markdown(rep))
    typer.echo(f"wrote {output_dir}/gap.json, gap.md and gap.png")
    if cfg.backend == "vllm" and cfg.needs_engine():
        hard_exit(0)  # the vLLM CPU engine can abort in interpreter teardown
