"""The bench's arithmetic and table on synthetic timings, its runner and CLI wiring, and the queue line for real."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from mindgap.bench.context import BenchContext
from mindgap.bench.report import LineResult, Report
from mindgap.bench.runner import plan, run_bench, select, wait_for_idle
from mindgap.bench.timings import Row, fmt, rate_stat, summarize

MACHINE = {"cpu_model": "Test CPU", "cpus": 2, "memory_gib": 8.0, "gpu": None, "loadavg": "0.1", "versions": {}}


def test_summarize_median_quartiles_and_spread():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.low, s.high) == (3.0, 1.0, 5.0)
    assert (s.q1, s.q3) == (2.0, 4.0)
    assert s.n == 5
    assert s.values == (5.0, 1.0, 3.0, 2.0, 4.0)  # run order kept for the JSON


def test_summarize_small_samples():
    one = summarize([7.0])
    assert (one.median, one.low, one.high, one.q1, one.q3) == (7.0,) * 5
    two = summarize([1.0, 3.0])
    assert two.median == 2.0 and (two.q1, two.q3) == (1.5, 2.5)
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_rate_stat_is_per_repetition():
    s = rate_stat([100, 300], [1.0, 2.0])  # 100/s and 150/s, not 400/3
    assert s.median == 125.0 and (s.low, s.high) == (100.0, 150.0)
    with pytest.raises(ValueError, match="positive"):
        rate_stat([1], [0.0])
    with pytest.raises(ValueError, match="amounts"):
        rate_stat([1, 2], [1.0])


def _row(ours: list[float], theirs: list[float], **kw) -> Row:
    return Row(
        line="x", metric="m", unit="u", mindgap=summarize(ours), baseline=summarize(theirs), baseline_name="b", **kw
    )


def test_ratio_and_conservative_range():
    row = _row([90, 100, 110], [95, 100, 105], target=0.95)
    assert row.ratio == pytest.approx(1.0)
    assert row.ratio_range == pytest.approx((90 / 105, 110 / 95))
    assert row.meets_target is True
    assert _row([80], [100], target=0.95).meets_target is False
    assert _row([80], [100]).meets_target is None
    lower = _row([2.0], [4.0], higher_is_better=False, target=0.6, target_op="<=")
    assert lower.ratio == 0.5 and lower.meets_target is True
    assert math.isinf(_row([1.0], [0.0]).ratio)


def test_fmt_three_significant_figures():
    assert fmt(0) == "0"
    assert fmt(1234.5) == "1,234"
    assert fmt(0.98765) == "0.988"
    assert fmt(56.04) == "56.0"
    assert fmt(2.5e7) == "2.50e+07"


def _report(rows: list[Row], error: str | None = None) -> Report:
    report = Report(started="2026-01-02T03:04:05Z", quick=True, repeat=3, machine=MACHINE, seconds=90)
    report.lines.append(LineResult(name="x", rows=rows))
    if error:
        report.lines.append(LineResult(name="broken", error=error))
    return report


def test_markdown_table_lists_every_row_with_spread_and_target(tmp_path: Path):
    rows = [
        _row([90, 100, 110], [95, 100, 105], target=0.95, note="tiny model"),
        _row([50.0], [100.0], target=0.9),
    ]
    md = _report(rows, error="RuntimeError: boom").to_markdown()
    assert "Test CPU, 2 CPUs" in md and "GPU: none" in md
    lines = [line for line in md.splitlines() if line.startswith("| x |")]
    assert len(lines) == 2
    assert "100 (90.0–110)" in lines[0] and "b: 100 (95.0–105)" in lines[0] and ">= 0.95: met" in lines[0]
    assert "0.500" in lines[1] and "**missed**" in lines[1]
    assert "- x / m: tiny model" in md
    assert "**broken failed**: RuntimeError: boom" in md


def test_report_write_json_markdown_and_latest(tmp_path: Path):
    report = _report([_row([1.0, 2.0, 3.0], [2.0], target=0.5)])
    json_path, md_path = report.write(tmp_path / "results")
    assert json_path.name == "20260102T030405Z.json" and md_path.suffix == ".md"
    data = json.loads(json_path.read_text())
    row = data["lines"][0]["rows"][0]
    assert row["ratio"] == 1.0 and row["ratio_min"] == 0.5 and row["ratio_max"] == 1.5
    assert row["mindgap"]["values"] == [1.0, 2.0, 3.0] and row["target"] == ">= 0.5" and row["meets_target"] is True
    assert data["machine"]["cpu_model"] == "Test CPU" and data["quick"] is True
    assert (tmp_path / "results" / "latest.md").read_text() == md_path.read_text()


def test_select_and_plan():
    assert select([]) == ["queue", "service", "rewrite", "reload", "trainer"]
    assert select(["trainer", "queue"]) == ["queue", "trainer"]
    assert select(["memory"]) == ["service", "trainer"]
    with pytest.raises(ValueError, match="unknown bench line 'nope'"):
        select(["nope"])
    assert plan(["rewrite", "reload", "trainer"]) == {
        "rewriting": frozenset({"rewrite", "reload"}),
        "trainer": frozenset({"trainer"}),
    }


def test_run_bench_records_a_broken_line_and_goes_on(tmp_path: Path):
    seen: list[frozenset[str]] = []

    def good(ctx: BenchContext, parts: frozenset[str]) -> LineResult:
        seen.append(parts)
        assert ctx.quick and ctx.repeat == 2 and ctx.work_dir.is_dir()
        return LineResult(name="queue", rows=[_row([1.0], [1.0])])

    def broken(ctx: BenchContext, parts: frozenset[str]) -> LineResult:
        raise RuntimeError("engine would not start")

    written: list[int] = []
    report = run_bench(
        ["queue", "rewrite", "reload"],
        quick=True,
        repeat=2,
        data_dir=tmp_path,
        runners={"queue": good, "rewriting": broken},
        on_line=lambda r: written.append(len(r.lines)),
    )
    assert seen == [frozenset({"queue"})]
    assert written == [1, 2]  # the report is handed out after every line, so a cut-short run keeps results
    assert [line.name for line in report.lines] == ["queue", "rewrite+reload"]
    assert [line.name for line in report.failed] == ["rewrite+reload"]
    assert report.failed[0].error == "RuntimeError: engine would not start"
    assert report.machine["cpus"] >= 1 and "cpu_model" in report.machine


def test_each_line_waits_for_an_idle_machine_and_records_its_load(tmp_path: Path):
    loads = iter([3.0, 2.0, 0.8, 0.5])
    slept: list[float] = []
    assert wait_for_idle(1.0, 60, poll_s=5, load=lambda: next(loads), sleep=slept.append) == (0.8, 10.0)
    assert slept == [5, 5]
    # still busy after the timeout: measured anyway, with the load it had
    assert wait_for_idle(1.0, 10, poll_s=5, load=lambda: 4.0, sleep=slept.append) == (4.0, 10.0)

    waits: list[tuple[float, float]] = []

    def idle(max_load: float, timeout_s: float) -> tuple[float, float]:
        waits.append((max_load, timeout_s))
        return 0.4, 12.0

    def line(ctx: BenchContext, parts: frozenset[str]) -> LineResult:
        return LineResult(name="queue", rows=[_row([1.0], [1.0])], info={"examples": 3})

    report = run_bench(
        ["queue", "trainer"],
        quick=True,
        repeat=1,
        data_dir=tmp_path,
        runners={"queue": line, "trainer": line},
        max_load=1.0,
        idle_timeout_s=30,
        idle=idle,
    )
    assert waits == [(1.0, 30), (1.0, 30)]  # before every line
    assert report.lines[0].info == {"examples": 3, "loadavg_at_start": 0.4, "idle_wait_s": 12.0}


def test_cli_rejects_unknown_line():
    from typer.testing import CliRunner

    from mindgap.cli import _register, app

    _register()
    result = CliRunner().invoke(app, ["bench", "--only", "nope"])
    assert result.exit_code == 2
    assert "unknown bench line 'nope'" in result.output


@pytest.mark.redis
@pytest.mark.slow
def test_queue_line_runs_for_real(tmp_path: Path):
    from mindgap.bench.lines import queue

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    ctx = BenchContext(quick=True, repeat=2, work_dir=tmp_path, data_dir=tmp_path)
    result = queue.run(ctx, n=100, batch=16)
    (row,) = result.rows
    assert row.line == "queue" and row.mindgap.n == 2 and row.baseline.n == 2
    assert row.mindgap.median > 0 and row.baseline.median > 0
    assert row.ratio == pytest.approx(row.mindgap.median / row.baseline.median)
    assert result.info["payload_bytes"] > 5000  # a realistic record: 256 tokens with both log-prob lists


async def test_naive_schedule_keeps_what_the_pipeline_keeps_from_more_tokens() -> None:
    from mindgap.bench.engine_worker import naive_batch
    from services.fake_engine import FakeEngine
    from services.pipeline import rewrite_batch
    from shared.config import StageParams
    from shared.grading import Grader
    from shared.schema import Problem

    # the fake's default script: (a + b) % 3 == 2 always right, == 1 right every other sample, == 0 only guided
    problems = [
        Problem(id=f"{a}-{b}", question=f"What is {a}+{b}?", answer=str(a + b)) for a in (1, 2, 3) for b in (1, 2)
    ]
    params = StageParams(k=4, resolve_attempts=4, keep=1, rounds=2)
    with Grader(workers=1) as grader:
        engine = FakeEngine.from_config()
        outcomes = await rewrite_batch(problems, engine, grader, params)
        naive_engine = FakeEngine.from_config()
        naive = await naive_batch(problems, naive_engine, grader, params)
    stages = [o.stage.value for o in outcomes if o.stage is not None]
    assert {"self": naive["self"], "guided": naive["guided"]} == {s: stages.count(s) for s in ("self", "guided")}
    assert naive["examples"] == sum(len(o.examples) for o in outcomes) == len(problems)
    assert naive["tokens"] > sum(o.generated_tokens for o in outcomes)
    # params.score is off: both score only for the guidance filter's likelihood check, the same responses
    assert naive_engine.stats.scored_tokens == engine.stats.scored_tokens > 0


def test_every_line_names_a_module_with_a_runner() -> None:
    from mindgap.bench.runner import LINES, _runner

    for module in set(LINES.values()):
        assert callable(_runner(module)), module


def test_gpu_warm_up_reports_throughput_over_its_seconds() -> None:
    from mindgap.bench.train_worker import warm_up

    result = warm_up({"seconds": 0.3, "size": 256})
    assert len(result["gflops"]) >= 1 and all(g > 0 for g in result["gflops"])
