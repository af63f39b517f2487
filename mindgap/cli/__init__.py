"""The `mindgap` command line: one Typer app; each area registers its commands from its own module.

Command modules import nothing heavy at module level (no torch, vLLM, transformers, FastAPI), so
`mindgap --help` is instant; the work is imported inside each command.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

# every command configures its logging with this (mindgap at INFO, libraries at WARNING unless -v)
from shared.logs import setup_logging as setup_logging

if TYPE_CHECKING:
    from shared.config import MindgapSettings

S = TypeVar("S", bound="MindgapSettings")

app = typer.Typer(
    name="mindgap",
    help="Guided Re-solving for stable off-policy SFT: rewrite data toward the policy, train on it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module registers its commands on `app` when imported.
COMMAND_MODULES = ("rewrite", "inspect", "model", "service", "train", "up", "evaluate", "bench", "doctor")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `message` as one clear error line and return the Exit to raise."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def load_config(cls: type[S], config: Path | None, logger: logging.Logger | None = None, **overrides: Any) -> S:
    """Resolve a process config from `config` + env + flags; bad values exit with one line naming the fields.

    Nested tables in `overrides` (e.g. ``engine={"model": …}``) are merged into the file's and the
    environment's, not swapped for them. With `logger`, the resolved config is logged.
    """
    from pydantic import ValidationError

    try:
        cfg = cls.load(config, **overrides)
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    except ValidationError as exc:
        problems = "; ".join(
            ": ".join(part for part in (".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, ")) if part)
            for e in exc.errors()
        )
        raise fail(f"invalid configuration: {problems}") from None
    if logger is not None:
        cfg.log_resolved(logger)
    return cfg


def hard_exit(code: int) -> None:
    """Exit without running interpreter teardown.

    vLLM's CPU engine sometimes aborts in C++ destructors at interpreter exit (exit 134) after all work
    is done; once results are written and engines shut down, skipping teardown keeps the exit status true.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"mindgap.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"mindgap.cli.{name}":
                raise


def main() -> None:
    """Console-script entry point; an engine that cannot start ends any command with one error line."""
    _register()
    try:
        app()
    except Exception as exc:
        from services.engine import EngineStartError  # not needed to start the CLI

        if not isinstance(exc, EngineStartError):
            raise
        fail(str(exc))
        hard_exit(1)
