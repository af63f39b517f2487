"""`mindgap eval`: benchmark registry, the eval runner on the fake engine (hand-computed scores), the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mindgap.cli import _register, app
from mindgap.evaluation.accuracy import EvalSet, evaluate_set, load_benchmark, load_eval_set, markdown
from mindgap.evaluation.benchmarks import BENCHMARKS, BenchmarkError, benchmark_path, parse_benchmark_names
from services.engine import SamplingConfig
from services.fake_engine import FakeEngine
from shared.dataio import DataError, FieldMap
from shared.grading import Grader

# The fake engine's arithmetic script: (a+b) % 3 == 2 always right, == 1 right on odd samples, == 0 never.
ROWS = [
    {"q": "What is 1+1?", "a": "2", "topic": "easy"},  # 4/4 correct
    {"q": "What is 1+0?", "a": "1", "topic": "mixed"},  # 2/4 (samples 1 and 3)
    {"q": "What is 1+2?", "a": "3", "topic": "easy"},  # 0/4
    {"q": "What is 2+5?", "topic": "mixed"},  # no gold answer: counted, not evaluated
]


@pytest.fixture
def problems_file(tmp_path: Path) -> Path:
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def invoke(*args: str | Path):
    _register()
    name = ["eval"] if isinstance(typer.main.get_command(app), typer.core.TyperGroup) else []
    return CliRunner().invoke(app, [*name, *map(str, args)])


# ------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_loads_with_gold_answers(name: str, data_dir: Path) -> None:
    data = load_benchmark(name, limit=8, root=data_dir)
    assert len(data.problems) == 8 - data.ungradable
    assert all(p.question and p.answer for p in data.problems)
    assert len({p.id for p in data.problems}) == len(data.problems)
    if BENCHMARKS[name].subject_field is not None:
        assert all(s for s in data.subjects)
    else:
        assert data.subjects == [None] * len(data.problems)


def test_benchmark_gold_answers_by_hand(data_dir: Path) -> None:
    aime = load_benchmark("aime24", limit=1, root=data_dir)
    assert aime.problems[0].answer == "204" and aime.problems[0].id == "60"
    math500 = load_benchmark("math500", limit=1, root=data_dir)
    assert math500.subjects == ["Precalculus"]
    assert math500.problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    # Minerva has no answer field: the gold answer comes from the solution's last \boxed{}
    minerva = load_benchmark("minerva_math", limit=1, root=data_dir)
    assert minerva.problems[0].answer is not None and minerva.problems[0].answer.startswith("1.6")
    olympiad = load_benchmark("olympiadbench", limit=1, root=data_dir)
    assert olympiad.problems[0].answer == "2" and olympiad.subjects == ["Combinatorics"]


def test_benchmark_names_and_missing_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_benchmark_names("math500, aime24,math500") == ["math500", "aime24"]
    with pytest.raises(BenchmarkError, match="'gsm9k'"):
        parse_benchmark_names("math500,gsm9k")
    monkeypatch.setenv("MINDGAP_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(BenchmarkError, match="MINDGAP_DATA_DIR"):
        benchmark_path("math500")
    monkeypatch.setenv("MINDGAP_DATA_DIR", str(tmp_path))
    with pytest.raises(BenchmarkError, match=r"benchmarks/aime24/test\.jsonl"):
        benchmark_path("aime24")


def test_load_eval_set_mapping_subjects_and_errors(problems_file: Path) -> None:
    data = load_eval_set("arith", problems_file, FieldMap(question="q", answer="a"), subject_field="topic")
    assert [p.answer for p in data.problems] == ["2", "1", "3"]
    assert data.subjects == ["easy", "mixed", "easy"] and data.ungradable == 1
    with pytest.raises(DataError, match="'grade'"):
        load_eval_set("arith", problems_file, FieldMap(question="q", answer="a"), subject_field="grade")
    with pytest.raises(DataError, match="no problem with a gold answer"):
        load_eval_set("arith", problems_file, FieldMap(question="q"))  # "a" is not auto-detected


# ------------------------------------------------------------------------------------------ the runner


async def test_evaluate_set_scores_match_hand_computed(problems_file: Path) -> None:
    data = load_eval_set("arith", problems_file, FieldMap(question="q", answer="a"), subject_field="topic")
    engine = FakeEngine()
    with Grader(workers=1, timeout=10) as grader:
        result = await evaluate_set(engine, grader, data, SamplingConfig(n=4, temperature=1.0), chunk_size=2)
    assert [c.n for c in engine.calls] == [4, 4, 4]
    assert [sum(row) for row in result.correctness("qwen")] == [4, 2, 0]
    assert result.correctness("qwen") == result.correctness("math_verify")
    out = result.to_json()
    for method in ("qwen", "math_verify"):
        acc = out[method]
        assert acc["avg_at_n"] == pytest.approx(6 / 12)
        assert acc["pass_at_k"]["2"] == pytest.approx((1 + 5 / 6 + 0) / 3)  # 1 − C(2,2)/C(4,2) for 2/4
        assert acc["pass_at_k"]["4"] == pytest.approx(2 / 3)
    assert out["by_subject"]["easy"]["qwen"]["avg_at_n"] == pytest.approx(0.5)
    assert out["by_subject"]["mixed"]["math_verify"]["avg_at_n"] == pytest.approx(0.5)
    assert out["ungradable"] == 1 and out["truncated_share"] == 0.0


async def test_truncated_responses_are_graded_and_counted() -> None:
    from shared.schema import Problem

    data = EvalSet("t", [Problem(id="1", question="What is 1+1?", answer="2")], [None])
    with Grader(workers=1, timeout=10) as grader:
        result = await evaluate_set(FakeEngine(), grader, data, SamplingConfig(n=2, max_tokens=5))
    out = result.to_json()
    assert out["truncated_share"] == 1.0 and out["mean_response_tokens"] == 5
    assert out["qwen"]["avg_at_n"] == 0.0 and "by_subject" not in out


# ---------------------------------------------------------------------------------------------- CLI


def test_eval_cli_writes_json_and_markdown(problems_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "res" / "eval.json"
    samples = tmp_path / "res" / "samples.jsonl"
    result = invoke(
        "--data", problems_file, "--fields", "question=q", "--fields", "answer=a", "--subject-field", "topic",
        "--n", "4", "--temperature", "1.0", "-o", out, "--samples-output", samples, "--backend", "fake",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rep = json.loads(out.read_text())
    bench = rep["benchmarks"]["arith"]
    assert bench["problems"] == 3 and bench["qwen"]["avg_at_n"] == pytest.approx(0.5)
    assert rep["sampling"] == {"n": 4, "temperature": 1.0, "top_p": 1.0, "max_tokens": 1024}
    md = out.with_suffix(".md").read_text()
    assert "| arith | 3 | 50.0 | 50.0 | 66.7 | 66.7 | 0.0 |" in md
    assert "| easy | 2 | 50.0 | 50.0 |" in md
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 12 and sum(r["correct"]["qwen"] for r in rows) == 6
    assert markdown(rep) == md


def test_eval_cli_limit_applies_per_data_set(problems_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = invoke(
        "--data", problems_file, "--fields", "question=q", "--fields", "answer=a", "--limit", "1",
        "--n", "2", "-o", out, "--backend", "fake",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["benchmarks"]["arith"]["problems"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "nothing to evaluate"),
        (("--benchmarks", "math500,gsm9k"), "unknown benchmark 'gsm9k'"),
        (("--data", "/no/such/file.jsonl"), "data file not found"),
        (("--data", "{file}", "--fields", "question=nope"), "unknown field 'nope'"),
        (("--data", "{file}", "--n", "0"), "n:"),
    ],
)
def test_eval_cli_errors_are_one_line(args: tuple[str, ...], message: str, problems_file: Path, tmp_path: Path) -> None:
    args = tuple(a.replace("{file}", str(problems_file)) for a in args)
    result = invoke(*args, "-o", tmp_path / "x.json", "--backend", "fake")
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_eval_cli_reads_a_split_of_an_hf_datasets_folder(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "arith_hf"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:1]), "test": datasets.Dataset.from_list(ROWS)}
    ).save_to_disk(str(folder))
    out = tmp_path / "eval.json"
    fields = ("--fields", "question=q", "--fields", "answer=a")
    result = invoke("--data", folder, *fields, "--split", "test", "--n", "2", "-o", out, "--backend", "fake")
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["benchmarks"]["arith_hf"]["problems"] == 3  # the gradable rows of the test split
    result = invoke("--data", folder, *fields, "--split", "nope", "-o", out, "--backend", "fake")
    assert result.exit_code == 2 and "nope" in result.output
