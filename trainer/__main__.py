"""`python -m trainer` / `torchrun … -m trainer [--config F] [--key value …]`: one trainer process per rank.

This is what torchrun starts on every rank (`mindgap train --nproc N` relaunches through it). It parses
`TrainerConfig` itself with pydantic-settings' CLI parser: the flags are the config fields in kebab
case (`--max-steps 10`, `--resume/--no-resume`), the same names `mindgap train` takes. Precedence as
everywhere: flags, then `MINDGAP_…` environment, then the TOML file named by `--config`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource

from shared.logs import setup_logging
from trainer.config import TrainerConfig

log = logging.getLogger("mindgap.trainer")


def _error(message: str) -> SystemExit:
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def parse_args(argv: list[str]) -> tuple[TrainerConfig, bool]:
    """The resolved config and the verbose flag of one rank's command line; bad input raises SystemExit(2)."""
    # --config and -v are not config fields: take them off before the settings parser sees the rest
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    pre.add_argument("-v", "--verbose", action="store_true")
    known, rest = pre.parse_known_args(argv)
    cli: CliSettingsSource[Any] = CliSettingsSource(
        TrainerConfig,
        cli_parse_args=rest,
        cli_prog_name="python -m trainer",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_exit_on_error=True,
    )
    overrides: dict[str, Any] = cli()
    try:
        cfg = TrainerConfig.load(known.config, **overrides)
    except FileNotFoundError as exc:
        raise _error(str(exc)) from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise _error(f"invalid configuration: {problems}") from None
    return cfg, known.verbose


def main(argv: list[str] | None = None) -> None:
    cfg, verbose = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(verbose)  # before torch, DeepSpeed and transformers are imported (trainer.train)
    if cfg.nproc > 1 and "LOCAL_RANK" not in os.environ:
        raise _error(f"nproc {cfg.nproc}: start the ranks with `mindgap train --nproc N` or torchrun")
    from trainer.train import run

    try:
        run(cfg)
    except ValueError as exc:  # configuration problems found once the world size is known
        raise _error(str(exc)) from None


if __name__ == "__main__":
    main()
