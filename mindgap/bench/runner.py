"""Runs the bench lines in order, each isolated: one that breaks is recorded with its error, the rest go on.

Lines import their heavy dependencies (vLLM, torch, the service, the trainer) only when they run, and the
engines and trainers they measure run as child processes, so one line's memory never inflates the next's.
"""

from __future__ import annotations

import importlib
import logging
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from mindgap.bench.context import BenchContext
from mindgap.bench.machine import machine_info
from mindgap.bench.report import LineResult, Report

log = logging.getLogger("mindgap.bench")

# line name → the module that measures it, in run order (cheapest first). rewrite and reload share one
# engine start, so they live in one module; the memory figures come from the service and trainer lines
# (they own the processes whose peak RSS is sampled).
LINES: dict[str, str] = {
    "queue": "queue",
    "service": "service",
    "rewrite": "engine",
    "reload": "engine",
    "trainer": "trainer",
}
ALIASES = {"memory": ("service", "trainer")}

# A line module's entry point: measure the selected parts (line names) of that module.
LineRunner = Callable[[BenchContext, frozenset[str]], LineResult]


def select(only: Sequence[str]) -> list[str]:
    """The lines to run, in run order, for `--only` names (all when empty); unknown names raise."""
    if not only:
        return list(LINES)
    wanted: set[str] = set()
    for name in only:
        if name in LINES:
            wanted.add(name)
        elif name in ALIASES:
            wanted.update(ALIASES[name])
        else:
            known = ", ".join([*LINES, *ALIASES])
            raise ValueError(f"--only: unknown bench line {name!r} (known: {known})")
    return [name for name in LINES if name in wanted]


def plan(names: Sequence[str]) -> dict[str, frozenset[str]]:
    """Group selected line names by the module that measures them, keeping run order."""
    grouped: dict[str, set[str]] = {}
    for name in names:
        grouped.setdefault(LINES[name], set()).add(name)
    return {module: frozenset(parts) for module, parts in grouped.items()}


def _runner(module: str) -> LineRunner:
    runner: LineRunner = importlib.import_module(f"mindgap.bench.lines.{module}").run
    return runner


def run_bench(
    names: Sequence[str],
    quick: bool,
    repeat: int,
    data_dir: Path,
    model: str = "default",
    work_dir: Path | None = None,
    runners: dict[str, LineRunner] | None = None,
    on_line: Callable[[Report], object] | None = None,
) -> Report:
    """Run `names` (from `select`) and return the report.

    `on_line` sees the report after every line (the CLI writes it then, so a run cut short keeps what it
    measured); `runners` replaces line modules by name (tests).
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll of a bench job otherwise
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    report = Report(started=started, quick=quick, repeat=repeat, machine=machine_info())
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mindgap-bench-", dir=work_dir) as tmp:
        ctx = BenchContext(quick=quick, repeat=repeat, work_dir=Path(tmp), data_dir=data_dir, model=model)
        for module, parts in plan(names).items():
            name = "+".join(n for n in names if n in parts)
            log.info("bench %s: starting", name)
            start = time.monotonic()
            try:
                runner = runners[module] if runners is not None else _runner(module)
                result = runner(ctx, parts)
            except Exception as exc:  # one line's failure is a result, not the end of the run
                log.error("bench %s failed: %s", name, exc)
                log.debug("%s", traceback.format_exc())
                result = LineResult(name=name, error=f"{type(exc).__name__}: {exc}".strip()[:2000])
            result.seconds = time.monotonic() - start
            log.info("bench %s: done in %.0f s", name, result.seconds)
            report.lines.append(result)
            report.seconds = time.monotonic() - t0
            if on_line is not None:
                on_line(report)
    return report
