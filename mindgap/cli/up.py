"""`mindgap up DATA`: Redis, the rewrite service and the trainer on one machine, as one closed loop."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mindgap.cli import app, fail, load_config, setup_logging

if TYPE_CHECKING:
    from mindgap.up import UpPlan, UpResult

log = logging.getLogger("mindgap.up")


@app.command()
def up(
    data: Path = typer.Argument(..., help="problems: JSONL/JSON/parquet, submitted as an online job"),
    fields: list[str] | None = typer.Option(None, help="field mapping, e.g. question=problem (repeatable)"),
    model: str | None = typer.Option(None, help="HF id, local path or 'default' (SmolLM2-135M-Instruct)"),
    nproc: int | None = typer.Option(None, help="trainer ranks on this machine (torchrun when > 1)"),
    max_versions: int | None = typer.Option(None, help="stop after the service loaded N new policy versions"),
    checkpoint_every: int | None = typer.Option(None, help="trainer steps between policy versions"),
    loss: str | None = typer.Option(None, help="trainer loss: sft | dft | is"),
    epochs: int | None = typer.Option(None, help="passes over DATA (default: cycle until stopped)"),
    k: int | None = typer.Option(None, "--k", help="self-samples per problem"),
    resolve_attempts: int | None = typer.Option(None, help="guided attempts per unsolved problem"),
    max_tokens: int | None = typer.Option(None, help="response length cap"),
    max_lag: int | None = typer.Option(None, help="pause rewriting while the trainer lags more examples (64)"),
    backend: str | None = typer.Option(None, help="service inference engine: vllm (default) or fake"),
    host: str | None = typer.Option(None, help="service bind address (default 127.0.0.1)"),
    port: int | None = typer.Option(None, help="service port (default: a free one)"),
    key_prefix: str | None = typer.Option(None, help="prefix of every Redis key (default mindgap)"),
    run_dir: Path | None = typer.Option(None, help="logs, Redis data and checkpoints (default out/up-<time>)"),
    service_config: Path | None = typer.Option(None, help="TOML config passed to `mindgap serve`"),
    train_config: Path | None = typer.Option(None, help="TOML config passed to `mindgap train`"),
    grace_s: float | None = typer.Option(None, help="seconds each child gets to stop before SIGKILL (30)"),
    config: Path | None = typer.Option(None, "--config", help="TOML config of this command"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Start Redis (unless MINDGAP_REDIS_URL is set), the service and the trainer; rewrite DATA online."""
    from mindgap.up import OrchestrateError, UpConfig, UpPlan
    from shared.dataio import DataError, parse_field_specs

    setup_logging(verbose)
    # one request line per status poll would bury the live line
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not data.is_file():
        raise fail(f"DATA: no such file {data}")
    for flag, path in (("--service-config", service_config), ("--train-config", train_config)):
        if path is not None and not path.is_file():
            raise fail(f"{flag}: no such file {path}")
    try:
        field_map = parse_field_specs(fields).mapped()
    except DataError as exc:
        raise fail(f"--fields: {exc}") from None
    params = {"k": k, "resolve_attempts": resolve_attempts, "max_tokens": max_tokens}
    cli: dict[str, Any] = {
        "data": data,
        "fields": field_map or None,
        "params": {key: v for key, v in params.items() if v is not None} or None,
        "model": model,
        "nproc": nproc,
        "max_versions": max_versions,
        "checkpoint_every": checkpoint_every,
        "loss": loss,
        "epochs": epochs,
        "max_lag": max_lag,
        "backend": backend,
        "host": host,
        "port": port,
        "key_prefix": key_prefix,
        "run_dir": run_dir,
        "service_config": service_config,
        "train_config": train_config,
        "grace_s": grace_s,
        "verbose": verbose or None,
    }
    cfg = load_config(UpConfig, config, log, **cli)
    plan = UpPlan.from_config(cfg)
    typer.echo(f"run folder {plan.run_dir} (logs in {plan.run_dir / 'logs'})")
    typer.echo(f"service {plan.service_url} (bearer key in {plan.run_dir / 'api_key'})")
    try:
        result = asyncio.run(_run_live(plan))
    except OrchestrateError as exc:
        tail = getattr(getattr(exc, "child", None), "log_tail", lambda: "")()
        if tail:
            typer.secho(tail, err=True, dim=True)
        raise fail(str(exc), code=1) from None
    _report(result)


async def _run_live(plan: UpPlan) -> UpResult:
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from mindgap.up import LoopStatus, run_up

    console = Console(stderr=True)
    try:
        with Live(Text("starting Redis, service and trainer…"), console=console, refresh_per_second=4) as live:

            def show(status: LoopStatus) -> None:
                live.update(Text(status.line()))

            return await run_up(plan, show)
    finally:
        if not console.is_terminal:
            console.line()  # off a terminal, Live leaves its last line unterminated


def _report(result: UpResult) -> None:
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.table import Table

    why = "reached --max-versions" if result.reason == "max-versions" else "stopped"
    typer.echo(f"{why}: policy versions after v{result.start_version}, the version served at the start")
    table = Table()
    for col in ("version", "loaded at (UTC)", "reload s", "outcome"):
        table.add_column(col)
    for r in result.reloads:
        table.add_row(
            f"v{r.version}",
            datetime.fromtimestamp(r.time, UTC).strftime("%Y-%m-%d %H:%M:%S"),
            f"{r.duration_s:.2f}",
            r.outcome if r.outcome == "loaded" else f"{r.outcome}: {r.error or '?'}",
        )
    Console(width=120).print(table)
    typer.echo(f"run folder {result.run_dir}")
