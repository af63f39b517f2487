"""Dataset input (every shared data file through field mapping, all formats, bad rows) and atomic output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.dataio import (
    DataError,
    FieldMap,
    RowError,
    atomic_write_jsonl,
    atomic_write_text,
    parse_field_specs,
    parse_upload,
    read_examples,
    read_problems,
    read_problems_from_rows,
)
from shared.schema import ChatMessage, Example, Sampling, Stage

# (file, --fields specs, rows, limit or None) — the invocations a user would type for each source.
SHARED_FILES = [
    ("gsm8k/train.jsonl", ["solution=answer"], 7473, None),
    ("benchmarks/math500/test.jsonl", [], 500, None),
    ("benchmarks/minerva_math/test.jsonl", [], 272, None),
    (
        "benchmarks/olympiadbench/test.jsonl",
        ["question=question", "answer=final_answer", "solution=solution"],
        675,
        None,
    ),
    ("benchmarks/aime24/test.jsonl", ["id=id"], 30, None),
    ("benchmarks/amc23/test.jsonl", ["question=problem", "answer=answer"], 40, None),
]


@pytest.mark.parametrize(("name", "specs", "rows", "limit"), SHARED_FILES, ids=[f[0] for f in SHARED_FILES])
def test_shared_data_files(data_dir: Path, name: str, specs: list[str], rows: int, limit: int | None) -> None:
    result = read_problems(data_dir / name, parse_field_specs(specs), limit=limit)
    assert len(result.problems) == rows
    assert result.errors == [] and result.ungradable == 0
    assert all(p.answer for p in result.problems)
    assert len({p.id for p in result.problems}) == rows


def test_gsm8k_answer_field_is_solution_and_gold(data_dir: Path) -> None:
    [p] = read_problems(data_dir / "gsm8k/train.jsonl", None, limit=1).problems
    assert p.id == "1" and p.answer == "72"
    assert p.solution is not None and p.solution.endswith("#### 72")


def test_minerva_gold_comes_from_boxed(data_dir: Path) -> None:
    [p] = read_problems(data_dir / "benchmarks/minerva_math/test.jsonl", None, limit=1).problems
    assert p.answer == "1.6" and p.solution is not None and "\\boxed{1.6}" in p.solution


def test_olympiadbench_lists_become_text(data_dir: Path) -> None:
    fields = parse_field_specs(["question=question", "answer=final_answer", "solution=solution"])
    problems = read_problems(data_dir / "benchmarks/olympiadbench/test.jsonl", fields).problems
    assert problems[1].answer == "\\frac{1}{2 n+2}"
    assert all("$" not in (p.answer or "") for p in problems)
    assert all(isinstance(p.solution, str) and p.solution for p in problems)


def test_amc_numbers_and_aime_ids(data_dir: Path) -> None:
    amc = read_problems(data_dir / "benchmarks/amc23/test.jsonl", None, limit=2).problems
    assert [p.answer for p in amc] == ["27", "36"] and amc[0].solution is None
    aime = read_problems(data_dir / "benchmarks/aime24/test.jsonl", FieldMap(id="id"), limit=1).problems
    assert aime[0].id == "60" and aime[0].answer == "204"


def test_shuffle_then_limit_is_deterministic(data_dir: Path) -> None:
    path = data_dir / "benchmarks/math500/test.jsonl"
    a = [p.id for p in read_problems(path, None, limit=5, shuffle=True, seed=3).problems]
    b = [p.id for p in read_problems(path, None, limit=5, shuffle=True, seed=3).problems]
    c = [p.id for p in read_problems(path, None, limit=5, shuffle=True, seed=4).problems]
    assert a == b and a != c and a != ["1", "2", "3", "4", "5"]


# ---------------------------------------------------------------------------------- bad input


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BAD_JSONL = [
    json.dumps({"problem": "1+1?", "answer": "2"}),
    "",
    "{not json",
    json.dumps({"problem": "", "answer": "3"}),
    json.dumps(["a", "list"]),
    json.dumps({"problem": "2+2?", "solution": "so \\boxed{4}"}),
    json.dumps({"problem": "no gold here"}),
]


def test_malformed_lines_are_reported_with_physical_line_numbers(tmp_path: Path) -> None:
    result = read_problems(_write_lines(tmp_path / "d.jsonl", BAD_JSONL), None)
    assert [p.id for p in result.problems] == ["1", "6", "7"]
    assert [p.answer for p in result.problems] == ["2", "4", None]
    assert [e.line for e in result.errors] == [3, 4, 5]
    assert "invalid JSON" in result.errors[0].message
    assert "no question" in result.errors[1].message
    assert "JSON object" in result.errors[2].message
    assert result.ungradable == 1
    assert str(RowError(3, "x")) == "line 3: x"


def test_strict_mode_fails_at_first_bad_row(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="line 3: invalid JSON"):
        read_problems(_write_lines(tmp_path / "d.jsonl", BAD_JSONL), None, strict=True)


def test_unknown_field_is_named(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", BAD_JSONL)
    with pytest.raises(DataError, match="'final_answr' \\(mapped to answer\\)"):
        read_problems(path, parse_field_specs(["answer=final_answr"]))


@pytest.mark.parametrize(
    ("specs", "message"),
    [(["question"], "expected CANONICAL=SOURCE"), (["q=problem"], "not one of"), (["id=a", "id=b"], "mapped twice")],
)
def test_bad_field_specs(specs: list[str], message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_field_specs(specs)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"file not found: .*nope\.jsonl"):
        read_problems(tmp_path / "nope.jsonl", None)


def test_duplicate_ids_are_row_errors(tmp_path: Path) -> None:
    rows = [{"key": "a", "question": "q1"}, {"key": "b", "question": "q2"}, {"key": "a", "question": "q3"}]
    result = read_problems_from_rows(enumerate(rows, 1), FieldMap(id="key"))
    assert [p.id for p in result.problems] == ["a", "b"]
    assert result.errors == [RowError(3, "duplicate id 'a' (first seen on line 1)")]


def test_values_are_coerced_to_text() -> None:
    rows: list[tuple[int, dict[str, Any] | Exception]] = [
        (1, {"query": ["part one", "part two"], "target": 3.0, "output": ["step 1", "step 2"]}),
        (2, {"query": "q", "target": ["$3$", "$4$"]}),
        (3, {"query": "q2", "target": 0.25}),
    ]
    problems = read_problems_from_rows(rows).problems
    assert problems[0].question == "part one\n\npart two"
    assert problems[0].answer == "3" and problems[0].solution == "step 1\n\nstep 2"
    assert problems[1].answer == "3, 4"
    assert problems[2].answer == "0.25"


# ---------------------------------------------------------------------------------- formats

ROWS = [
    {"problem": "What is 1+1?", "final_answer": "2", "n": 1},
    {"problem": "What is 2+2?", "final_answer": "4", "n": 2},
    {"problem": "What is 3+3?", "final_answer": "6", "n": 3},
]


def _check_rows(path: Path, **kwargs: Any) -> None:
    result = read_problems(path, parse_field_specs(["question=problem", "answer=final_answer"]), **kwargs)
    assert [(p.id, p.question, p.answer) for p in result.problems] == [
        (str(i), r["problem"], r["final_answer"]) for i, r in enumerate(ROWS, 1)
    ]


def test_json_array_and_data_object(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    _check_rows(tmp_path / "a.json")
    _check_rows(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(DataError, match="array of objects"):
        read_problems(tmp_path / "c.json", None)


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    _check_rows(tmp_path / "d.parquet")
    uploaded = list(parse_upload((tmp_path / "d.parquet").read_bytes(), "up.parquet"))
    assert [line for line, _ in uploaded] == [1, 2, 3]


def test_hf_datasets_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    _check_rows(tmp_path / "single")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    _check_rows(tmp_path / "dict")
    only_test = read_problems(tmp_path / "dict", None, split="test")
    assert len(only_test.problems) == 1
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "ambiguous"))
    with pytest.raises(DataError, match=r"--split .*a, b"):
        read_problems(tmp_path / "ambiguous", None)


def test_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in ROWS) + b"\r\n")
    _check_rows(path)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    _check_rows(tmp_path / "bom.json")


def test_upload_jsonl_lines(tmp_path: Path) -> None:
    data = "\n".join(BAD_JSONL).encode()
    items = list(parse_upload(data, "up.jsonl"))
    assert [line for line, _ in items] == [1, 3, 4, 5, 6, 7]
    assert isinstance(items[1][1], ValueError)


# ---------------------------------------------------------------------------------- output


def _example(i: int) -> Example:
    return Example(
        id=f"e{i}",
        problem_id=str(i),
        prompt=[ChatMessage(role="user", content="q")],
        completion=[ChatMessage(role="assistant", content="a")],
        completion_token_ids=[1, 2],
        stage=Stage.SELF,
        policy_version=0,
        sampling=Sampling(temperature=0.7, top_p=1.0),
        behavior_logprobs=[-0.1, -0.2],
        target_logprobs=[-0.1, -0.2],
        answer="a",
        grade="correct",
    )


def test_atomic_jsonl_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.jsonl"
    assert atomic_write_jsonl(out, [_example(1), _example(2).model_dump(mode="json")]) == 2
    read = list(read_examples(out))
    assert [(line, ex.id) for line, ex in read if isinstance(ex, Example)] == [(1, "e1"), (2, "e2")]


def test_read_examples_reports_bad_records(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(_example(1).model_dump_json() + "\n" + json.dumps({"id": "x"}) + "\n")
    read = list(read_examples(out))
    assert isinstance(read[0][1], Example) and read[1][0] == 2 and isinstance(read[1][1], Exception)


def test_interrupted_write_keeps_old_file(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    atomic_write_text(out, "old contents\n")

    def records() -> Any:
        yield _example(1)
        raise KeyboardInterrupt  # the user presses Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write_jsonl(out, records())
    assert out.read_text() == "old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind
