"""`mindgap bench`: measure mindgap against its natural baselines and write the results table."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from mindgap.cli import app, fail, setup_logging

REPO = Path(__file__).resolve().parents[2]


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="small workloads (under 20 minutes on a 2-core CPU)"),
    only: list[str] | None = typer.Option(
        None, "--only", help="run only this line (repeatable): queue, service, rewrite, reload, trainer, memory"
    ),
    repeat: int | None = typer.Option(None, "--repeat", min=1, help="timed repetitions per figure (3 quick, 5 full)"),
    out: Path = typer.Option(REPO / "bench" / "results", "--out", help="folder for <timestamp>.json/.md, latest.md"),
    data_dir: Path = typer.Option(
        Path(os.environ.get("MINDGAP_DATA_DIR", REPO.parent / "shared" / "data")),
        "--data-dir",
        help="folder holding gsm8k/train.jsonl",
    ),
    model: str = typer.Option("default", "--model", help="the real model where model speed matters"),
    max_load: float = typer.Option(
        1.0,
        "--max-load",
        min=0.0,
        help="before each line, wait until the 1-minute load average is below this (0: don't)",
    ),
    idle_timeout: float = typer.Option(
        1800.0, "--idle-timeout", min=0.0, help="seconds to wait for that before measuring anyway (noted per line)"
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Run the bench lines (each mindgap figure beside its baseline, same workload, same run); write the table."""
    from mindgap.bench.runner import run_bench, select

    setup_logging(verbose)
    try:
        names = select(only or [])
    except ValueError as exc:
        raise fail(str(exc)) from None
    if not (data_dir / "gsm8k" / "train.jsonl").is_file() and set(names) - {"queue"}:
        raise fail(f"--data-dir: {data_dir / 'gsm8k' / 'train.jsonl'} not found")
    report = run_bench(
        names,
        quick=quick,
        repeat=repeat or (3 if quick else 5),
        data_dir=data_dir,
        model=model,
        on_line=lambda r: r.write(out),
        max_load=max_load,
        idle_timeout_s=idle_timeout,
    )
    json_path, md_path = report.write(out)
    typer.echo(report.to_markdown())
    typer.echo(f"wrote {json_path} and {md_path}")
    if report.failed:
        raise fail(f"{len(report.failed)} bench line(s) failed: " + ", ".join(r.name for r in report.failed), code=1)
