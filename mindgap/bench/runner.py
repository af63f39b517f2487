"""Runs the bench lines in order, each isolated: one that breaks is recorded with its error, the rest go on.

Lines import their heavy dependencies (vLLM, torch, the service, the trainer) only when they run, and the
engines and trainers they measure run as child processes, so one line's memory never inflates the next's.
Before each line the runner waits for an idle machine (1-minute load average below `max_load`), since on
a 2-core machine any other process moves every ratio; the load each line started at is recorded.
"""

from __future__ import annotations

import importlib
import logging
import os
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
    "rewrite": "rewriting",
    "reload": "rewriting",
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


def wait_for_idle(
    max_load: float,
    timeout_s: float,
    poll_s: float = 5.0,
    load: Callable[[], float] = lambda: os.getloadavg()[0],
    sleep: Callable[[float], object] = time.sleep,
) -> tuple[float, float]:
    """Wait until the 1-minute load average is below `max_load`, at most `timeout_s`; (last load, seconds waited)."""
    waited = 0.0
    current = load()
    while current >= max_load and waited < timeout_s:
        if waited == 0.0:
            log.info("bench: waiting for load %.2f to fall below %.2f", current, max_load)
        sleep(poll_s)
        waited += poll_s
        current = load()
    if current >= max_load:
        log.warning("bench: load %.2f still above %.2f after %.0f s; measuring anyway", current, max_load, waited)
    return current, waited


def run_bench(
    names: Sequence[str],
    quick: bool,
    repeat: int,
    data_dir: Path,
    model: str = "default",
    work_dir: Path | None = None,
    runners: dict[str, LineRunner] | None = None,
    on_line: Callable[[Report], object] | None = None,
    max_load: float = 0.0,
    idle_timeout_s: float = 1800.0,
    idle: Callable[[float, float], tuple[float, float]] = wait_for_idle,
) -> Report:
    """Run `names` (from `select`) and return the report.

    `on_line` sees the report after every line (the CLI writes it then, so a run cut short keeps what it
    measured); `runners` replaces line modules by name and `idle` the wait for an idle machine (tests).
    With `max_load` > 0 each line starts once the load average is below it (or `idle_timeout_s` passed).
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll of a bench job otherwise
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    report = Report(started=started, quick=quick, repeat=repeat, machine=machine_info())
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mindgap-bench-", dir=work_dir) as tmp:
        ctx = BenchContext(quick=quick, repeat=repeat, work_dir=Path(tmp), data_dir=data_dir, model=model)
        for module, parts in plan(names).items():
            name = "+".join(n for n in names if n in parts)
            load, waited = idle(max_load, idle_timeout_s) if max_load > 0 else (os.getloadavg()[0], 0.0)
            log.info("bench %s: starting at load %.2f", name, load)
            start = time.monotonic()
            try:
                runner = runners[module] if runners is not None else _runner(module)
                result = runner(ctx, parts)
            except Exception as exc:  # one line's failure is a result, not the end of the run
                log.error("bench %s failed: %s", name, exc)
                log.debug("%s", traceback.format_exc())
                result = LineResult(name=name, error=f"{type(exc).__name__}: {exc}".strip()[:2000])
            result.seconds = time.monotonic() - start
            result.info |= {"loadavg_at_start": round(load, 2), "idle_wait_s": round(waited, 1)}
            log.info("bench %s: done in %.0f s", name, result.seconds)
            report.lines.append(result)
            report.seconds = time.monotonic() - t0
            if on_line is not None:
                on_line(report)
    return report
