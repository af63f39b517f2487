"""`mindgap rewrite IN -o OUT`: Guided Re-solving of a dataset file on an in-process engine."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from mindgap.cli import app, fail, hard_exit, load_config, setup_logging

if TYPE_CHECKING:
    from services.offline import RewriteConfig

log = logging.getLogger("mindgap.rewrite")


@app.command()
def rewrite(
    input: Path = typer.Argument(..., help="problems: JSONL, JSON, parquet, a local HF datasets folder or a hub id"),
    output: Path = typer.Option(..., "-o", "--output", help="records out: .jsonl or .parquet"),
    model: str | None = typer.Option(None, help="HF id, local path or 'default' (SmolLM2-135M-Instruct)"),
    fields: list[str] | None = typer.Option(None, help="field mapping, e.g. question=problem (repeatable)"),
    split: str | None = typer.Option(None, help="split of an HF datasets folder or hub dataset"),
    limit: int | None = typer.Option(None, help="rewrite at most N problems"),
    shuffle: bool = typer.Option(False, "--shuffle", help="shuffle rows before --limit"),
    seed: int | None = typer.Option(None, help="shuffle seed"),
    strict: bool = typer.Option(False, "--strict", help="a bad input row is fatal instead of skipped"),
    k: int | None = typer.Option(None, "--k", help="self-samples per problem"),
    resolve_attempts: int | None = typer.Option(None, help="guided attempts per unsolved problem"),
    keep: int | None = typer.Option(None, help="correct responses kept per problem at most"),
    temperature: float | None = typer.Option(None),
    top_p: float | None = typer.Option(None),
    max_tokens: int | None = typer.Option(None, help="response length cap; cut responses are not kept"),
    guidance: str | None = typer.Option(None, help="guided prompt mode: solution | answer | hint"),
    expert_format: str | None = typer.Option(
        None, help="expert demonstrations: raw (as written, default) | boxed (#### X → \\boxed{X}, no <<…>> notes)"
    ),
    guidance_filter: bool | None = typer.Option(
        None,
        "--guidance-filter/--no-guidance-filter",
        help="reject guided responses that lean on the guidance (on; thresholds: stages.guidance_* in TOML)",
    ),
    score: bool | None = typer.Option(
        None, "--score/--no-score", help="store target_logprobs: score kept responses on the training prompt (off)"
    ),
    batch_size: int | None = typer.Option(None, help="problems per pipeline batch"),
    config: Path | None = typer.Option(None, "--config", help="TOML config file"),
    backend: str | None = typer.Option(None, help="inference engine: vllm (default) or fake (tests)"),
    dtype: str | None = typer.Option(None),
    tensor_parallel_size: int | None = typer.Option(None),
    gpu_memory_utilization: float | None = typer.Option(None),
    max_model_len: int | None = typer.Option(None),
    enable_prefix_caching: bool | None = typer.Option(
        None, "--enable-prefix-caching/--no-enable-prefix-caching", help="vLLM prefix caching (default on)"
    ),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="skip torch.compile (faster start)"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Rewrite a math SFT dataset with self → guided → expert stages; print the stage table."""
    setup_logging(verbose)
    stages = {
        "k": k,
        "resolve_attempts": resolve_attempts,
        "keep": keep,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "guidance": guidance,
        "expert_format": expert_format,
        "guidance_filter": guidance_filter,
        "score": score,
    }
    engine_opts = {
        "model": model,
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "enable_prefix_caching": enable_prefix_caching,
        "enforce_eager": enforce_eager or None,
    }
    from services.offline import RewriteConfig

    cfg = load_config(
        RewriteConfig,
        config,
        log,
        input=input,
        output=output,
        fields=fields or None,
        split=split,
        limit=limit,
        shuffle=shuffle or None,
        seed=seed,
        strict=strict or None,
        batch_size=batch_size,
        backend=backend,
        stages={key: v for key, v in stages.items() if v is not None},
        engine={key: v for key, v in engine_opts.items() if v is not None},
    )
    code = asyncio.run(_run(cfg))
    if cfg.backend == "vllm":
        hard_exit(code)  # the vLLM CPU engine can abort in interpreter teardown
    if code:
        raise typer.Exit(code)


async def _run(cfg: RewriteConfig) -> int:
    """Read, rewrite, write, print; the exit status. User errors raise `fail()` before any engine starts."""
    from rich.console import Console
    from rich.markup import escape

    from services.engine import create_engine
    from services.offline import rewrite_problems
    from shared.dataio import DataError, is_hub_id, parse_field_specs, read_problems
    from shared.model_source import ModelNotAvailableError

    if not cfg.input.exists() and not is_hub_id(cfg.input):
        raise fail(f"input file not found: {cfg.input}")
    try:
        fields = parse_field_specs(cfg.fields) if cfg.fields else None
        result = read_problems(
            cfg.input,
            fields,
            limit=cfg.limit,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            strict=cfg.strict,
            split=cfg.split,
        )
    except (DataError, OSError) as exc:
        message = str(exc)
        raise fail(message if str(cfg.input) in message else f"{cfg.input}: {message}") from None
    err = Console(stderr=True)
    for row_error in result.errors:
        where = escape(f"{cfg.input}:{row_error.line}: {row_error.message}")
        err.print(f"[yellow]warning:[/] {where}, row skipped")
    if not result.problems:
        raise fail(f"no usable problems in {cfg.input}")

    try:
        engine = await create_engine(cfg.backend, cfg.engine)
    except ModelNotAvailableError as exc:
        raise fail(str(exc)) from None
    try:
        summary = await rewrite_problems(cfg, result.problems, engine, err, skipped_rows=len(result.errors))
    except Exception:
        log.exception("rewrite failed; %s was not written", cfg.output)
        return 1
    finally:
        await engine.shutdown()
    Console().print(summary.table())
    typer.echo(f"wrote {summary.examples} examples to {cfg.output} (summary: {cfg.summary_path})")
    return 0
