"""The offline rewrite run behind `mindgap rewrite`: file in, engine in process, records and summary out.

No server and no Redis: problems are read from a file, rewritten batch after batch by the pipeline,
and streamed to a temporary file beside the output that is renamed over it only when the whole run
succeeded, so an interrupted run never leaves a truncated file that looks complete.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

from pydantic import Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.engine import Engine
from services.pipeline import Summary, rewrite_batch
from shared.config import EngineConfig, MindgapSettings, StageParams
from shared.dataio import atomic_file, atomic_write_text, write_examples_parquet
from shared.grading import Grader
from shared.schema import Example, Problem

log = logging.getLogger("mindgap.rewrite")


class RewriteConfig(MindgapSettings):
    """Everything one `mindgap rewrite` process needs (TOML file, MINDGAP_… env, CLI flags)."""

    input: Path
    output: Path
    fields: list[str] = Field(
        default_factory=list,
        description="field mapping specs: question=problem, 'question={Body} {Question}', answer=meta.final, turn=-1",
    )
    split: str | None = Field(None, description="split of an HF datasets folder or hub dataset")
    limit: int | None = Field(None, ge=1)
    shuffle: bool = False
    seed: int = 0
    strict: bool = Field(False, description="a bad input row is fatal instead of skipped")
    batch_size: int = Field(64, ge=1, description="problems per pipeline batch")
    backend: Literal["vllm", "fake"] = "vllm"
    policy_version: int = Field(0, ge=0)
    grader_workers: int = Field(1, ge=1)
    grade_timeout: float = Field(5.0, gt=0)
    stages: StageParams = Field(default_factory=StageParams)
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @property
    def summary_path(self) -> Path:
        """Where the summary JSON goes: beside the output, `OUT.summary.json`."""
        return self.output.with_name(self.output.name + ".summary.json")


class AtomicRecordWriter:
    """Streams examples into a temporary file beside `path`; renames it over `path` only on success.

    JSONL is written line by line as batches finish; parquet is written once at the end (it has no
    append), from the records gathered in memory.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parquet = path.suffix == ".parquet"
        self.count = 0
        self._file: AbstractContextManager[BinaryIO] | None = None
        self._fh: BinaryIO | None = None
        self._rows: list[dict[str, Any]] = []

    def __enter__(self) -> AtomicRecordWriter:
        self._file = atomic_file(self.path)
        self._fh = self._file.__enter__()
        return self

    def write(self, examples: Iterable[Example]) -> None:
        """Append examples to the temporary file (or the parquet buffer)."""
        assert self._fh is not None, "use AtomicRecordWriter as a context manager"
        for ex in examples:
            if self.parquet:
                self._rows.append(ex.model_dump(mode="json"))
            else:
                self._fh.write(ex.model_dump_json().encode() + b"\n")
            self.count += 1
        self._fh.flush()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._file is not None and self._fh is not None
        if exc_type is None and self.parquet:
            write_examples_parquet(self._rows, self._fh)
        self._file.__exit__(exc_type, exc, tb)


async def rewrite_problems(
    cfg: RewriteConfig,
    problems: Sequence[Problem],
    engine: Engine,
    console: Console | None = None,
    skipped_rows: int = 0,
) -> Summary:
    """Rewrite `problems` batch by batch into `cfg.output`, write the summary JSON, return the summary."""
    summary = Summary(skipped_rows=skipped_rows)
    start = time.monotonic()
    progress = Progress(
        TextColumn("rewriting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("problems · {task.fields[examples]} examples"),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
    )
    with Grader(cfg.grader_workers, cfg.grade_timeout) as grader, AtomicRecordWriter(cfg.output) as writer:
        with progress:
            task = progress.add_task("rewrite", total=len(problems), examples=0)
            for i in range(0, len(problems), cfg.batch_size):
                batch = problems[i : i + cfg.batch_size]
                outcomes = await rewrite_batch(
                    batch, engine, grader, cfg.stages, cfg.policy_version, id_salt=cfg.input.name
                )
                writer.write(ex for out in outcomes for ex in out.examples)
                summary.add(outcomes)
                progress.update(task, advance=len(batch), examples=writer.count)
        summary.wall_seconds = time.monotonic() - start
    atomic_write_text(cfg.summary_path, json.dumps(summary.to_dict(), indent=2) + "\n")
    log.info("wrote %d examples to %s and the summary to %s", writer.count, cfg.output, cfg.summary_path)
    return summary
