"""Reading problem datasets (JSONL, JSON, parquet, local HF `datasets` folders) and writing outputs atomically.

Rows are numbered as a user would find them: physical line numbers in JSONL (blank lines skipped but
counted), 1-based row numbers elsewhere. Field mapping turns any source schema into `Problem`s; bad rows
become `RowError`s (or a `DataError` at once in strict mode) and never stop the good rows from loading.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ValidationError

from shared.grading import extract_gold
from shared.schema import Example, Problem

CANONICAL_FIELDS = ("id", "question", "solution", "answer")

# Source field names tried, in order, for a canonical field the user did not map. `id` is never guessed:
# without a mapping the row number is the id, so a sloppy source id column cannot collide.
AUTO_FIELDS: dict[str, tuple[str, ...]] = {
    "question": ("question", "problem", "prompt", "query", "instruction"),
    "solution": ("solution", "response", "output"),
    "answer": ("answer", "final_answer", "gold", "target"),
}

Row = dict[str, Any]
RowItem = tuple[int, Row | Exception]


class DataError(ValueError):
    """A dataset that cannot be read as asked: missing file, unknown field, or a bad row in strict mode."""


@dataclass(frozen=True)
class RowError:
    """A skipped row: its line (JSONL) or row number (other formats) and why."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class FieldMap:
    """Which source field feeds each canonical field; None means auto-detect (or, for `id`, the row number)."""

    id: str | None = None
    question: str | None = None
    solution: str | None = None
    answer: str | None = None

    def mapped(self) -> dict[str, str]:
        """The explicitly mapped canonical → source field pairs."""
        return {k: v for k in CANONICAL_FIELDS if (v := getattr(self, k)) is not None}


@dataclass
class ReadResult:
    """Problems read from a dataset, the rows skipped, and how many problems have no gold answer."""

    problems: list[Problem] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    ungradable: int = 0


def parse_field_specs(specs: Sequence[str] | None) -> FieldMap:
    """Parse `--field question=problem` style specs into a FieldMap."""
    mapping: dict[str, str] = {}
    for spec in specs or ():
        name, sep, source = (part.strip() for part in spec.partition("="))
        if not sep or not name or not source:
            raise DataError(f"bad field mapping {spec!r}: expected CANONICAL=SOURCE, e.g. question=problem")
        if name not in CANONICAL_FIELDS:
            raise DataError(f"bad field mapping {spec!r}: {name!r} is not one of {', '.join(CANONICAL_FIELDS)}")
        if name in mapping:
            raise DataError(f"field {name!r} is mapped twice")
        mapping[name] = source
    return FieldMap(**mapping)


# ---------------------------------------------------------------------------------------- raw rows


def _row_or_error(value: Any) -> Row | Exception:
    if isinstance(value, dict):
        return value
    return ValueError(f"expected a JSON object, got {type(value).__name__}")


def _jsonl_rows(lines: Iterable[bytes | str]) -> Iterator[RowItem]:
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as e:
            yield number, ValueError(f"not UTF-8 text ({e.reason})")
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark from some editors
        if not text.strip():
            continue
        try:
            yield number, _row_or_error(json.loads(text))
        except json.JSONDecodeError as e:
            yield number, ValueError(f"invalid JSON: {e.msg} (column {e.colno})")


def _json_rows(text: str, name: str) -> Iterator[RowItem]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line saved as .json
            yield from _jsonl_rows(text.splitlines())
            return
        raise DataError(f"{name}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError(f'{name}: expected a JSON array of objects or {{"data": [...]}}')
    for number, value in enumerate(doc, 1):
        yield number, _row_or_error(value)


def _parquet_rows(source: str | Path | io.BytesIO) -> Iterator[RowItem]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(source).iter_batches():
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _hf_rows(path: Path, split: str | None) -> Iterator[RowItem]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path} is a folder: reading HF datasets folders needs the `datasets` package") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path} is not a saved HF dataset folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        chosen = split or ("train" if "train" in ds else splits[0] if len(splits) == 1 else None)
        if chosen is None or chosen not in ds:
            raise DataError(f"{path}: choose a split with --split (available: {', '.join(splits)})")
        ds = ds[chosen]
    elif split is not None and split != str(ds.split or split):
        raise DataError(f"{path}: holds a single dataset (split {ds.split}), not split {split!r}")
    for number, row in enumerate(ds, 1):
        yield number, dict(row)


def iter_rows(path: str | Path, split: str | None = None) -> Iterator[RowItem]:
    """Raw rows of a dataset file or folder as (line or row number, dict or the error for that row)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"file not found: {p}")
    if p.is_dir():
        return _hf_rows(p, split)
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _parquet_rows(p)
    if suffix == ".json":
        return _json_rows(p.read_text(encoding="utf-8-sig", errors="replace"), str(p))

    def lines() -> Iterator[RowItem]:
        with p.open("rb") as f:
            yield from _jsonl_rows(f)

    return lines()


def parse_upload(data: bytes, filename: str) -> Iterator[RowItem]:
    """Rows of an uploaded file (JSONL, JSON or parquet, by file name) as (line, dict or error)."""
    suffix = Path(filename).suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            return _parquet_rows(io.BytesIO(data))
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{filename}: not a readable parquet file ({e})") from None
    if suffix == ".json":
        return _json_rows(data.decode("utf-8-sig", errors="replace"), filename)
    return _jsonl_rows(data.splitlines())


# --------------------------------------------------------------------------------- field mapping


def _to_text(value: Any, canonical: str) -> str | None:
    """Coerce a source value to text: integral floats lose `.0`, lists join (answers keep list form)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        parts = [p for p in (_to_text(v, canonical) for v in value) if p is not None]
        if canonical == "answer":
            # Written as a list so extract_gold treats it like OlympiadBench's list-as-text answers.
            return repr(parts) if len(parts) > 1 else (parts[0] if parts else None)
        return "\n\n".join(parts)
    return json.dumps(value, ensure_ascii=False, default=str)


def _source_field(row: Row, canonical: str, fields: FieldMap) -> str | None:
    mapped = getattr(fields, canonical)
    if mapped is not None:
        return mapped if mapped in row else None
    return next((name for name in AUTO_FIELDS.get(canonical, ()) if name in row), None)


def read_problems_from_rows(
    rows: Iterable[RowItem],
    fields: FieldMap | None = None,
    strict: bool = False,
    limit: int | None = None,
) -> ReadResult:
    """Map raw rows to Problems; bad rows become RowErrors (or a DataError when strict)."""
    fields = fields or FieldMap()
    result = ReadResult()
    seen_ids: dict[str, int] = {}
    seen_sources: set[str] = set()

    def reject(line: int, message: str) -> None:
        if strict:
            raise DataError(f"line {line}: {message}")
        result.errors.append(RowError(line, message))

    for line, row in rows:
        if limit is not None and len(result.problems) >= limit:
            break
        if isinstance(row, Exception):
            reject(line, str(row))
            continue
        seen_sources.update(row)
        values: dict[str, str | None] = {}
        for canonical in CANONICAL_FIELDS:
            source = _source_field(row, canonical, fields)
            text = _to_text(row[source], canonical) if source else None
            values[canonical] = text.strip() if text is not None and text.strip() else None
        question = values["question"]
        if question is None:
            where = fields.question or "/".join(AUTO_FIELDS["question"])
            reject(line, f"row has no question (field {where})")
            continue
        solution, answer = values["solution"], values["answer"]
        if solution is None and answer is not None and "####" in answer:
            solution = answer  # GSM8K: the answer field is the whole worked solution
        pid = values["id"] if fields.id is not None else str(line)
        if pid is None:
            reject(line, f"row has no id (field {fields.id})")
            continue
        if pid in seen_ids:
            reject(line, f"duplicate id {pid!r} (first seen on line {seen_ids[pid]})")
            continue
        seen_ids[pid] = line
        gold = extract_gold(answer, solution)
        result.problems.append(Problem(id=pid, question=question, solution=solution, answer=gold, meta={"line": line}))
    if result.problems or seen_sources:
        missing = [f"{src!r} (mapped to {name})" for name, src in fields.mapped().items() if src not in seen_sources]
        if missing:
            available = ", ".join(sorted(seen_sources)) or "none"
            raise DataError(f"unknown field {', '.join(missing)}: no row has it (fields present: {available})")
    result.ungradable = sum(p.answer is None for p in result.problems)
    return result


def read_problems(
    path: str | Path,
    fields: FieldMap | None = None,
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    strict: bool = False,
    split: str | None = None,
) -> ReadResult:
    """Read a dataset through the field mapping; `shuffle` (seeded) happens before `limit`."""
    if limit is not None and limit < 0:
        raise DataError("limit must be zero or more")
    # Without shuffling, stop reading once `limit` problems are in; a shuffle needs every row.
    result = read_problems_from_rows(iter_rows(path, split), fields, strict, None if shuffle else limit)
    if shuffle:
        random.Random(seed).shuffle(result.problems)
        if limit is not None:
            del result.problems[limit:]
        result.ungradable = sum(p.answer is None for p in result.problems)
    return result


def read_examples(path: str | Path) -> Iterator[tuple[int, Example | Exception]]:
    """Example records from a JSONL or parquet file, each with its line number, or the row's error."""
    for line, row in iter_rows(path):
        if isinstance(row, Exception):
            yield line, row
            continue
        if isinstance(row.get("meta"), str):  # parquet stores meta as JSON text
            try:
                row = {**row, "meta": json.loads(row["meta"])}
            except json.JSONDecodeError as e:
                yield line, e
                continue
        try:
            yield line, Example.model_validate(row)
        except ValidationError as e:
            yield line, e


# ---------------------------------------------------------------------------------- atomic writes


def _record_json(record: BaseModel | dict[str, Any]) -> str:
    if isinstance(record, BaseModel):
        return record.model_dump_json()
    return json.dumps(record, ensure_ascii=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary temp file beside `path` that replaces it (fsynced) only when the block succeeds.

    An interrupted or failed write leaves any old file intact and no temp file behind.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual mode of a new file
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable; some file systems refuse to open a directory, which is harmless.
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_examples_parquet(rows: Sequence[dict[str, Any]], sink: str | Path | BinaryIO) -> None:
    """Write example records (as JSON-mode dicts) to parquet.

    `meta` keys differ by stage, so it is stored as a JSON string: the table schema stays fixed and
    `read_examples` gives back exactly the dict that was written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{**r, "meta": json.dumps(r.get("meta") or {})} for r in rows]), sink)


def atomic_write_jsonl(path: str | Path, records: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Write records as JSONL atomically (an interrupted write leaves any old file intact); returns the count."""
    count = 0
    with atomic_file(path) as f:
        for record in records:
            f.write(_record_json(record).encode("utf-8") + b"\n")
            count += 1
    return count


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))
