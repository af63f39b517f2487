"""`mindgap doctor`: the smoke test of a fresh GPU machine or compose image (versions, devices, a tiny loop)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mindgap.cli import app, hard_exit, setup_logging


@app.command()
def doctor(
    model: str = typer.Option("default", help="HF id, local path or 'default' (SmolLM2-135M-Instruct)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the report as JSON here"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Report versions, devices and free memory; rewrite 8 problems, check scoring, reload, train 2 steps."""
    setup_logging(verbose)
    from mindgap.doctor import run

    report = run(model, emit=typer.echo)
    passed = sum(s.verdict == "PASS" for s in report.steps)
    typer.echo(f"{'ok' if report.ok else 'FAILED'}: {passed} of {len(report.steps)} steps passed")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    hard_exit(0 if report.ok else 1)  # vLLM's CPU engine may abort in teardown after all work is done
