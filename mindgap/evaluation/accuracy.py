"""The evaluation run behind `mindgap eval`: sample `n` responses per problem, grade two ways, summarise.

One engine serves every benchmark of a run. Each problem is asked with the training prompt
(`solve_messages`, the model's chat template); each response's final answer is graded against the gold
answer twice — with math-verify and with the Qwen2.5-Math-style equivalence check that papers report —
and both gradings go through `stats.accuracy` (avg@n and unbiased pass@k), overall and per subject.
A response cut at `max_tokens` is graded as it is (usually wrong); its share is reported.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mindgap.evaluation import estimators as stats
from mindgap.evaluation.benchmarks import BENCHMARKS, benchmark_path
from services.engine import Engine, Sample, SamplingConfig
from shared.config import EngineConfig, MindgapSettings
from shared.dataio import DataError, FieldMap, RowItem, iter_rows, read_problems_from_rows
from shared.grading import GradeMethod, Grader, extract_prediction
from shared.prompts import solve_messages
from shared.schema import Problem

log = logging.getLogger("mindgap.eval")

METHODS: tuple[GradeMethod, ...] = ("qwen", "math_verify")
METHOD_LABELS: dict[GradeMethod, str] = {"qwen": "Qwen-Math", "math_verify": "math-verify"}


class DataSpec(BaseModel):
    """A data file to evaluate on, with its field mapping and optional subject field."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    fields: list[str] = Field(default_factory=list, description="field mapping specs such as question=problem")
    subject_field: str | None = None


class EvalConfig(MindgapSettings):
    """Everything one `mindgap eval` process needs (TOML file, MINDGAP_… env, CLI flags)."""

    output: Path
    benchmarks: list[str] = Field(default_factory=list)
    data: list[DataSpec] = Field(default_factory=list)
    n: int = Field(16, ge=1, description="samples per problem")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(1024, ge=1)
    limit: int | None = Field(None, ge=1, description="first N problems of each data set")
    split: str | None = Field(None, description="split of --data HF datasets folders and hub ids (default: train)")
    chunk_size: int = Field(128, ge=1, description="problems sent to the engine at once")
    samples_output: Path | None = Field(None, description="optional JSONL with every graded response")
    backend: Literal["vllm", "fake"] = "vllm"
    grader_workers: int = Field(1, ge=1)
    grade_timeout: float = Field(5.0, gt=0)
    engine: EngineConfig = Field(default_factory=EngineConfig)

    def sampling(self) -> SamplingConfig:
        """The sampling parameters of every request."""
        return SamplingConfig(n=self.n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)


# ---------------------------------------------------------------------------------------- data sets


@dataclass
class EvalSet:
    """Gradable problems of one data set, their subject labels, and what was left out."""

    name: str
    problems: list[Problem]
    subjects: list[str | None]
    skipped_rows: int = 0
    ungradable: int = 0


def load_eval_set(
    name: str,
    path: Path,
    fields: FieldMap | None,
    subject_field: str | None = None,
    limit: int | None = None,
    split: str | None = None,
) -> EvalSet:
    """Read a data set through its field mapping; problems without a gold answer are counted, not kept."""
    subject_of_line: dict[int, str | None] = {}

    def tap(rows: Iterable[RowItem]) -> Iterator[RowItem]:
        for line, row in rows:
            if subject_field is not None and isinstance(row, dict):
                value = row.get(subject_field)
                subject_of_line[line] = None if value is None else str(value)
            yield line, row

    result = read_problems_from_rows(tap(iter_rows(path, split)), fields, strict=False, limit=limit)
    if subject_field is not None and result.problems and not any(s is not None for s in subject_of_line.values()):
        raise DataError(f"{path}: subject field {subject_field!r} is missing or empty in every row")
    gradable = [p for p in result.problems if p.answer is not None]
    if not gradable:
        raise DataError(f"{path}: no problem with a gold answer ({len(result.errors)} rows skipped)")
    for err in result.errors:
        log.warning("%s:%d: %s, row skipped", path, err.line, err.message)
    return EvalSet(
        name=name,
        problems=gradable,
        subjects=[subject_of_line.get(p.meta["line"]) for p in gradable],
        skipped_rows=len(result.errors),
        ungradable=result.ungradable,
    )


def load_benchmark(name: str, limit: int | None = None, root: Path | None = None) -> EvalSet:
    """One of the registered benchmarks, located in the shared data folder."""
    bench = BENCHMARKS.get(name)
    path = benchmark_path(name, root)  # raises a clear error for unknown names and missing files
    assert bench is not None
    return load_eval_set(name, path, bench.fields, bench.subject_field, limit)


def load_sets(cfg: EvalConfig) -> list[EvalSet]:
    """The benchmarks and data files a config names, in order; data sets are named by file stem."""
    from shared.dataio import parse_field_specs

    sets = [load_benchmark(name, cfg.limit) for name in cfg.benchmarks]
    names = {s.name for s in sets}
    for spec in cfg.data:
        name = spec.path.stem if spec.path.stem not in names else str(spec.path)
        fields = parse_field_specs(spec.fields)
        sets.append(load_eval_set(name, spec.path, fields, spec.subject_field, cfg.limit, cfg.split))
        names.add(name)
    return sets


# -------------------------------------------------------------------------------------------- the run


@dataclass
class GradedSample:
    """One graded response."""

    problem_id: str
    index: int
    text: str
    tokens: int
    finish_reason: str
    predicted: str | None
    correct: dict[GradeMethod, bool]


@dataclass
class SetResult:
    """All graded samples of one data set, problem by problem (n per problem)."""

    data: EvalSet
    samples: list[list[GradedSample]] = field(default_factory=list)

    def correctness(self, method: GradeMethod) -> list[list[bool]]:
        """Per-problem, per-sample correctness under one grading method."""
        return [[s.correct[method] for s in row] for row in self.samples]

    def to_json(self) -> dict[str, Any]:
        """Accuracy under both gradings, per subject, lengths and truncation."""
        flat = [s for row in self.samples for s in row]
        subjects = self.data.subjects
        out: dict[str, Any] = {
            "problems": len(self.samples),
            "skipped_rows": self.data.skipped_rows,
            "ungradable": self.data.ungradable,
            "mean_response_tokens": sum(s.tokens for s in flat) / len(flat),
            "truncated_share": sum(s.finish_reason == "length" for s in flat) / len(flat),
        }
        for method in METHODS:
            out[method] = stats.accuracy(self.correctness(method)).to_json()
        if any(s is not None for s in subjects):
            by_method = {m: stats.accuracy_by_subject(self.correctness(m), subjects) for m in METHODS}
            out["by_subject"] = {
                subject: {m: by_method[m][subject].to_json() for m in METHODS} for subject in by_method[METHODS[0]]
            }
        return out


async def evaluate_set(
    engine: Engine,
    grader: Grader,
    data: EvalSet,
    sampling: SamplingConfig,
    chunk_size: int = 128,
    on_progress: Callable[[int], None] | None = None,
) -> SetResult:
    """Sample `sampling.n` responses to every problem of `data` and grade each with both methods."""
    result = SetResult(data)
    for start in range(0, len(data.problems), chunk_size):
        chunk = data.problems[start : start + chunk_size]
        prompts = [engine.render_prompt(solve_messages(p.question)) for p in chunk]
        # The whole chunk goes to the engine at once, so it can batch across problems.
        drawn: list[list[Sample]] = await asyncio.gather(*(engine.generate(ids, sampling) for ids in prompts))
        items = [(s.text, p.answer or "") for p, samples in zip(chunk, drawn, strict=True) for s in samples]
        grades = {m: await grader.grade_batch(items, m) for m in METHODS}
        i = 0
        for p, samples in zip(chunk, drawn, strict=True):
            row = []
            for j, s in enumerate(samples):
                row.append(
                    GradedSample(
                        problem_id=p.id,
                        index=j,
                        text=s.text,
                        tokens=len(s.token_ids),
                        finish_reason=s.finish_reason,
                        predicted=extract_prediction(s.text),
                        correct={m: grades[m][i] for m in METHODS},
                    )
                )
                i += 1
            result.samples.append(row)
        if on_progress is not None:
            on_progress(len(chunk))
    return result


def report(results: Sequence[SetResult], cfg: EvalConfig) -> dict[str, Any]:
    """The JSON report: settings, per-benchmark results and the unweighted mean over benchmarks."""
    per_set = {r.data.name: r.to_json() for r in results}
    mean = {
        m: {
            "avg_at_n": sum(b[m]["avg_at_n"] for b in per_set.values()) / len(per_set),
            "pass_at_n": sum(b[m]["pass_at_k"][str(cfg.n)] for b in per_set.values()) / len(per_set),
        }
        for m in METHODS
    }
    return {
        "model": cfg.engine.model,
        "sampling": {"n": cfg.n, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens},
        "prompt": "solve_messages (chat template): question + 'Please reason step by step, … \\boxed{}'",
        "benchmarks": per_set,
        "mean_over_benchmarks": mean,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}" if math.isfinite(x) else "–"


def markdown(rep: dict[str, Any]) -> str:
    """A Markdown table of avg@n and pass@n under both gradings, then per-subject tables."""
    n = rep["sampling"]["n"]
    head = (
        f"Model `{rep['model']}`, n = {n}, temperature {rep['sampling']['temperature']}, "
        f"max {rep['sampling']['max_tokens']} tokens. Accuracy in %.\n\n"
    )
    cols = [f"avg@{n} ({METHOD_LABELS[m]})" for m in METHODS] + [f"pass@{n} ({METHOD_LABELS[m]})" for m in METHODS]
    lines = [
        "| benchmark | problems | " + " | ".join(cols) + " | truncated |",
        "|---|---:|" + "---:|" * len(cols) + "---:|",
    ]
    for name, b in rep["benchmarks"].items():
        vals = [_pct(b[m]["avg_at_n"]) for m in METHODS] + [_pct(b[m]["pass_at_k"][str(n)]) for m in METHODS]
        lines.append(f"| {name} | {b['problems']} | " + " | ".join(vals) + f" | {_pct(b['truncated_share'])} |")
    if len(rep["benchmarks"]) > 1:
        mean = rep["mean_over_benchmarks"]
        vals = [_pct(mean[m]["avg_at_n"]) for m in METHODS] + [_pct(mean[m]["pass_at_n"]) for m in METHODS]
        lines.append("| **mean** | | " + " | ".join(vals) + " | |")
    parts = [head + "\n".join(lines)]
    for name, b in rep["benchmarks"].items():
        if "by_subject" not in b:
            continue
        rows = [
            f"| {subject} | {s['qwen']['problems']} | " + " | ".join(_pct(s[m]["avg_at_n"]) for m in METHODS) + " |"
            for subject, s in b["by_subject"].items()
        ]
        parts.append(
            f"**{name}** by subject\n\n| subject | problems | avg@{n} (Qwen-Math) | avg@{n} (math-verify) |\n"
            "|---|---:|---:|---:|\n" + "\n".join(rows)
        )
    return "\n\n".join(parts) + "\n"


def sample_rows(results: Sequence[SetResult]) -> Iterator[dict[str, Any]]:
    """Every graded response as a JSON row (for `--samples-output`)."""
    for r in results:
        for p, row in zip(r.data.problems, r.samples, strict=True):
            for s in row:
                yield {
                    "benchmark": r.data.name,
                    "problem_id": s.problem_id,
                    "sample": s.index,
                    "gold": p.answer,
                    "predicted": s.predicted,
                    "correct": s.correct,
                    "tokens": s.tokens,
                    "finish_reason": s.finish_reason,
                    "response": s.text,
                }


async def run_eval(
    cfg: EvalConfig, sets: Sequence[EvalSet], engine: Engine, grader: Grader | None = None
) -> dict[str, Any]:
    """Evaluate every set on one engine, write the JSON and Markdown reports, return the JSON report.

    A caller that evaluates several models can pass one `grader` for all; otherwise one is made and closed.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from shared.dataio import atomic_write_jsonl, atomic_write_text

    results = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    own = grader is None
    grading = Grader(cfg.grader_workers, cfg.grade_timeout) if grader is None else grader
    try:
        with progress:
            for data in sets:
                task = progress.add_task(f"eval {data.name}", total=len(data.problems))

                def advance(k: int, task: TaskID = task) -> None:
                    progress.update(task, advance=k)

                results.append(await evaluate_set(engine, grading, data, cfg.sampling(), cfg.chunk_size, advance))
    finally:
        if own:
            grading.close()
    rep = report(results, cfg)
    atomic_write_text(cfg.output, json.dumps(rep, indent=2) + "\n")
    atomic_write_text(markdown_path(cfg.output), markdown(rep))
    if cfg.samples_output is not None:
        atomic_write_jsonl(cfg.samples_output, sample_rows(results))
    return rep


def markdown_path(output: Path) -> Path:
    """Where the Markdown table goes: beside the JSON, same stem, `.md`."""
    return output.with_suffix(".md")
