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
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ValidationError

from shared.grading import find_gold
from shared.layouts import (
    AUTO_FIELDS,
    CHAT_FIELDS,
    Mapped,
    RowReject,
    Source,
    compile_source,
    describe_row,
    map_row,
    normalize_gold,
    suggest_question,
    top_level_name,
)
from shared.schema import Example, Problem
from shared.wire import DataPreview, PreviewProblem, RowError

CANONICAL_FIELDS = ("id", "question", "solution", "answer")
TURN_FIELD = "turn"  # not a field: which user turn of a conversation to read (`turn=2`, `turn=-1`)
# Problem meta that every example record made from the problem carries: the gold as the dataset wrote it
# ("9 (apples)" for the gold 9) and a system turn the question came with.
RECORD_META = ("answer_text", "system")
FIELDS_FLAG = "--fields"  # how errors tell a CLI user to map a field (job specs take the same CANONICAL=SOURCE)

Row = dict[str, Any]
RowItem = tuple[int, Row | Exception]


class DataError(ValueError):
    """A dataset that cannot be read as asked: missing file, unknown field, or a bad row in strict mode."""


@dataclass(frozen=True)
class FieldMap:
    """Which source feeds each canonical field — a field name, a dotted path (`meta.final`) or a template
    (`{Body} {Question}`) — and which user turn of a conversation is read. None means auto-detect (for
    `id`: the row number; for `turn`: a conversation must hold a single exchange)."""

    id: str | None = None
    question: str | None = None
    solution: str | None = None
    answer: str | None = None
    turn: int | None = None

    def mapped(self) -> dict[str, str]:
        """The explicit mapping as CANONICAL → SOURCE specs (`turn` included), as a job spec's `fields`."""
        specs = {k: v for k in CANONICAL_FIELDS if (v := getattr(self, k)) is not None}
        return specs | ({TURN_FIELD: str(self.turn)} if self.turn is not None else {})

    def sources(self) -> dict[str, Source | None]:
        """Each canonical field's compiled source (None: auto-detect)."""
        return {k: None if (v := getattr(self, k)) is None else compile_source(v) for k in CANONICAL_FIELDS}


@dataclass
class ReadResult:
    """Problems read from a dataset, the rows skipped, and how the rows were read.

    `sources` counts, per canonical field (plus `gold` and `system`), where the values came from
    ("'messages' user turn": 120); `skipped` counts the skipped rows by kind of failure.
    """

    problems: list[Problem] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    ungradable: int = 0
    rows: int = 0
    sources: dict[str, Counter[str]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)


def parse_field_specs(specs: Sequence[str] | None) -> FieldMap:
    """Parse `--fields question=problem` style specs (paths, templates, `turn=N`) into a FieldMap."""
    mapping: dict[str, Any] = {}
    for spec in specs or ():
        name, sep, source = (part.strip() for part in spec.partition("="))
        if not sep or not name or not source:
            raise DataError(f"bad field mapping {spec!r}: expected CANONICAL=SOURCE, e.g. question=problem")
        if name not in (*CANONICAL_FIELDS, TURN_FIELD):
            raise DataError(
                f"bad field mapping {spec!r}: {name!r} is not one of {', '.join(CANONICAL_FIELDS)} or {TURN_FIELD}"
            )
        if name in mapping:
            raise DataError(f"field {name!r} is mapped twice")
        if name == TURN_FIELD:
            try:
                mapping[name] = int(source)
            except ValueError:
                mapping[name] = 0
            if mapping[name] == 0:
                raise DataError(f"bad field mapping {spec!r}: turn is a user turn number: 1, 2, … or -1 for the last")
            continue
        try:
            compile_source(source)
        except ValueError as exc:
            raise DataError(f"bad field mapping {spec!r}: {exc}") from None
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
        except RecursionError:
            yield number, ValueError("JSON nested too deep to read")
        except ValueError as e:  # an integer of more digits than Python converts (4300)
            yield number, ValueError(f"unreadable JSON: {e}")


def _json_rows(text: str, name: str) -> Iterator[RowItem]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line saved as .json
            yield from _jsonl_rows(text.splitlines())
            return
        raise DataError(f"{name}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{name}: JSON nested too deep to read") from None
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        raise DataError(f"{name}: unreadable JSON: {e}") from None
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


def _datasets_module(what: str) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{what}: reading HF datasets needs the `datasets` package") from e
    return datasets


def _choose_split(ds: Any, split: str | None, where: str) -> Any:
    """The split asked for of a DatasetDict (else `train`, else its only split); a Dataset as is."""
    datasets = _datasets_module(where)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        chosen = split or ("train" if "train" in ds else splits[0] if len(splits) == 1 else None)
        if chosen is None or chosen not in ds:
            asked = f"no split {split!r}; " if split is not None else ""
            raise DataError(f"{where}: {asked}choose a split with --split (available: {', '.join(splits)})")
        return ds[chosen]
    if split is not None and split != str(ds.split or split):
        raise DataError(f"{where}: holds a single dataset (split {ds.split}), not split {split!r}")
    return ds


def _hf_rows(path: Path, split: str | None) -> Iterator[RowItem]:
    datasets = _datasets_module(f"{path} is a folder")
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path} is not a saved HF dataset folder ({e})") from None
    for number, row in enumerate(_choose_split(ds, split, str(path)), 1):
        yield number, dict(row)


# `owner/name` or `owner/name:config`, never a file name: what a hub id looks like on the command line.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".pq", ".csv", ".txt")


def is_hub_id(path: str | Path) -> bool:
    """Whether `path` names a Hugging Face hub dataset (`openai/gsm8k`, `openai/gsm8k:main`), not a local path."""
    text = str(path)
    return bool(_HUB_ID.fullmatch(text)) and not text.lower().endswith(_DATA_SUFFIXES) and not Path(text).exists()


def _hub_rows(name: str, split: str | None) -> Iterator[RowItem]:
    datasets = _datasets_module(name)
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # offline, unknown id, gated, bad split: datasets raises many types
        raise DataError(
            f"{name}: no such file or folder, and cannot load it from the Hugging Face hub ({type(e).__name__}: {e})"
        ) from None
    for number, row in enumerate(_choose_split(ds, split, name), 1):
        yield number, dict(row)


def iter_rows(path: str | Path, split: str | None = None) -> Iterator[RowItem]:
    """Raw rows of a dataset file, HF folder or hub id, as (line or row number, dict or the error for that row)."""
    p = Path(path)
    if is_hub_id(path):
        return _hub_rows(str(path), split)
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


SHOWN_REJECTS = 3  # rejected rows quoted in a whole-file error


def _unknown_fields(fields: FieldMap, seen: set[str]) -> list[str]:
    """Mapped sources whose first path segment no row had (`seen`: the rows' keys, case-folded)."""
    missing = []
    for name, source in fields.sources().items():
        for path in source.paths if source is not None else ():
            if path.casefold() not in seen and top_level_name(path).casefold() not in seen:
                missing.append(f"{path!r} (mapped to {name})")
    return missing


def _whole_file_error(result: ReadResult, first_row: tuple[int, Row] | None) -> DataError:
    """One error for a file none of whose rows could be read: the layout found and the mapping that fits."""
    kinds = ", ".join(f"{kind} ×{n}" for kind, n in result.skipped.most_common())
    skipped = len(result.errors)
    message = f"no row could be read as a problem ({skipped} row{'s' if skipped != 1 else ''} skipped: {kinds})"
    if first_row is not None:
        line, row = first_row
        message += f". Line {line} has {describe_row(row) or 'no fields'}"
        top = result.skipped.most_common(1)[0][0]
        if top == "multi-turn conversation":
            message += f". Read one exchange of each: {FIELDS_FLAG} turn=-1 (the last user turn) or turn=1"
        elif top == "no question" and (guess := suggest_question(row)) is not None:
            looked = "/".join((*AUTO_FIELDS["question"], *CHAT_FIELDS))
            message += f"; none is a question field ({looked}). Map one: {FIELDS_FLAG} question={guess}"
    quoted = "; ".join(str(e) for e in result.errors[:SHOWN_REJECTS])
    return DataError(f"{message}. First: {quoted}")


def _problem(line: int, pid: str, mapped: Mapped, result: ReadResult) -> Problem:
    """The Problem of a mapped row, its gold answer found and normalised, and where everything came from."""
    question, solution, answer = (mapped.values.get(k) for k in ("question", "solution", "answer"))
    assert question is not None
    sources = dict(mapped.sources)
    if solution is None and answer is not None and ("####" in answer or "\n" in answer):
        # GSM8K and the like: the answer field is the whole worked solution
        solution, sources["solution"] = answer, f"{sources['answer']} (worked solution)"
    found = find_gold(answer, solution)
    meta: dict[str, Any] = {"line": line}
    gold = None
    if found is not None:
        gold = normalize_gold(found.text)
        sources["gold"] = f"{sources[found.field]} {found.convention}".strip()
        # The gold as the dataset wrote it ("9 (apples)", "$5"), when that is not the gold itself.
        written = answer if found.field == "answer" and "\n" not in (answer or "") else found.text
        if written is not None and written != gold:
            meta["answer_text"] = written
    if mapped.system is not None:
        meta["system"] = mapped.system
    for name in ("question", "solution", "gold", "system"):
        if name in sources or name != "system":
            result.sources.setdefault(name, Counter())[sources.get(name, "none")] += 1
    return Problem(id=pid, question=question, solution=solution, answer=gold, meta=meta)


def read_problems_from_rows(
    rows: Iterable[RowItem],
    fields: FieldMap | None = None,
    strict: bool = False,
    limit: int | None = None,
) -> ReadResult:
    """Map raw rows to Problems; bad rows become RowErrors (or a DataError when strict).

    A DataError also when the mapping names a field no row has, or when rows were seen but none could
    be read (the error names the layout found and the mapping that would fit it).
    """
    fields = fields or FieldMap()
    sources = fields.sources()
    result = ReadResult()
    seen_ids: dict[str, int] = {}
    seen_keys: set[str] = set()  # case-folded, for the unknown-field check
    seen_names: set[str] = set()
    first_row: tuple[int, Row] | None = None

    def reject(line: int, kind: str, message: str) -> None:
        if strict:
            raise DataError(f"line {line}: {message}")
        result.errors.append(RowError(line, message))
        result.skipped[kind] += 1

    for line, row in rows:
        if limit is not None and len(result.problems) >= limit:
            break
        result.rows += 1
        if isinstance(row, Exception):
            reject(line, "unreadable row", str(row))
            continue
        first_row = first_row or (line, row)
        seen_names.update(str(k) for k in row)
        seen_keys.update(str(k).casefold() for k in row)
        try:
            mapped = map_row(row, sources, fields.turn)
        except RowReject as exc:
            reject(line, exc.kind, exc.message)
            continue
        if mapped.values.get("question") is None:
            where = fields.question or "/".join((*AUTO_FIELDS["question"], *CHAT_FIELDS))
            reject(line, "no question", f"row has no question (field {where})")
            continue
        pid = mapped.values.get("id") if fields.id is not None else str(line)
        if pid is None:
            reject(line, "no id", f"row has no id (field {fields.id})")
            continue
        if pid in seen_ids:
            reject(line, "duplicate id", f"duplicate id {pid!r} (first seen on line {seen_ids[pid]})")
            continue
        seen_ids[pid] = line
        result.problems.append(_problem(line, pid, mapped, result))
    if result.problems or seen_keys:
        missing = _unknown_fields(fields, seen_keys)
        if missing:
            available = ", ".join(sorted(seen_names)) or "none"
            raise DataError(f"unknown field {', '.join(missing)}: no row has it (fields present: {available})")
    if not result.problems and result.errors:
        raise _whole_file_error(result, first_row)
    result.ungradable = sum(p.answer is None for p in result.problems)
    return result


def preview(result: ReadResult, fields: FieldMap | None = None, shown: int = 3, errors: int = 20) -> DataPreview:
    """What `mindgap inspect` prints and a dry-run job answers: the mapping, `shown` problems, the counts."""
    return DataPreview(
        fields=(fields or FieldMap()).mapped(),
        mapping={name: dict(counts.most_common()) for name, counts in result.sources.items()},
        rows=result.rows,
        readable=len(result.problems),
        ungradable=result.ungradable,
        skipped=len(result.errors),
        skipped_reasons=dict(result.skipped.most_common()),
        errors=result.errors[:errors],
        problems=[
            PreviewProblem(
                line=p.meta["line"],
                id=p.id,
                question=p.question,
                solution=p.solution,
                answer=p.answer,
                meta={k: v for k, v in p.meta.items() if k != "line"},
            )
            for p in result.problems[:shown]
        ],
    )


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
