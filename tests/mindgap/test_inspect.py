"""`mindgap inspect` shows how a dataset reads before a run, and `mindgap rewrite` (fake engine) turns every
public layout, with no mapping, into records whose prompt is the question and whose answer is the gold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from mindgap.cli import _register, app
from shared.dataio import read_problems
from shared.prompts import solve_messages
from shared.schema import Example
from shared.wire import DataPreview

LAYOUTS = Path(__file__).resolve().parents[1] / "shared" / "data" / "layouts"

# file → (a phrase of the first question, the first gold)
FIRST: dict[str, tuple[str, str]] = {
    "gsm8k.jsonl": ("Natalia sold clips to 48 of her friends", "72"),
    "numinamath_cot.jsonl": ("smallest positive integer $n$", "3"),
    "math_chat.jsonl": ("If $x + y = 10$ and $x - y = 2$", "6"),
    "trl_conversational.jsonl": ("A rectangle is 3 cm wide", "12"),
    "trl_plain.jsonl": ("Solve for $x$: $2x + 3 = 11$.", "4"),
    "metamathqa.jsonl": ("What is the value of unknown variable x?", "48"),
    "svamp.jsonl": ("discount of 25 dollars on each pack How much do you have to pay", "51"),
    "asdiv.jsonl": ("Seven red apples and two green apples are in the basket. How many apples", "9"),
    "openmathinstruct2.jsonl": ("A bookstore sells 29 books", "174"),
}


def invoke(command: str, *args: str | Path) -> Result:
    _register()
    name = [command] if isinstance(typer.main.get_command(app), typer.core.TyperGroup) else []
    return CliRunner().invoke(app, [*name, *map(str, args)], env={"MINDGAP_BACKEND": "fake"})


def test_inspect_prints_mapping_problems_and_counts() -> None:
    result = invoke("inspect", LAYOUTS / "asdiv.jsonl", "--show", "2")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "question ← 'body' + 'question' (3)" in out and "gold     ← 'answer' (3)" in out
    assert "problem 1 (line 1, id 1)" in out and "problem 2 (line 2, id 2)" in out and "problem 3" not in out
    assert "question: Seven red apples and two green apples are in the basket. How many apples" in out
    assert "gold:     9   (written: '9 (apples)')" in out
    assert "rows 3 · readable 3 · ungradable 0 (no gold answer) · skipped 0" in out


def test_inspect_counts_ungradable_and_skipped_rows_with_reasons(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "\\boxed{4}"}]},
        {"messages": [{"role": "user", "content": "Describe a circle."}, {"role": "assistant", "content": "Round."}]},
        {"messages": [{"role": "system", "content": "Be brief."}]},
        {
            "messages": [
                {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2+2?"},
            ]
        },
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    result = invoke("inspect", data)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "rows 5 · readable 2 · ungradable 1 (no gold answer) · skipped 3" in out
    assert "gold:     — (ungradable)" in out
    assert "skipped: " in out and "no user turn ×1" in out and "multi-turn conversation ×1" in out
    assert "unreadable row ×1" in out
    assert "line 3: 'messages' is a list of chat messages with no user turn (system)" in out
    assert "line 5: invalid JSON" in out


def test_inspect_json_is_the_dry_run_preview() -> None:
    result = invoke("inspect", LAYOUTS / "svamp.jsonl", "--fields", "question={Question}", "--json", "-n", "1")
    assert result.exit_code == 0, result.output
    report = DataPreview.model_validate_json(result.output)
    assert report.fields == {"question": "{Question}"} and report.readable == 2
    assert report.mapping["question"] == {"'{Question}'": 2}
    assert [p.question for p in report.problems] == ["How much do you have to pay to buy each pack?"]


def test_inspect_of_an_unreadable_layout_names_the_fix(tmp_path: Path) -> None:
    data = tmp_path / "odd.jsonl"
    data.write_text(json.dumps({"Problem_Text": "What is 3*3?", "Sol": "9"}) + "\n")
    result = invoke("inspect", data)
    assert result.exit_code == 2
    assert "Map one: --fields question=Problem_Text" in result.output and "Traceback" not in result.output
    fixed = invoke("inspect", data, "--fields", "question=Problem_Text", "--fields", "answer=Sol")
    assert fixed.exit_code == 0 and "gold:     9" in fixed.output


@pytest.mark.parametrize("name", sorted(FIRST))
def test_rewrite_reads_every_layout_with_no_mapping(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = invoke("rewrite", LAYOUTS / name, "-o", out, "--k", "1", "--resolve-attempts", "1")  # fake engine
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    records = [Example.model_validate_json(line) for line in out.read_text().splitlines()]
    first = [r for r in records if r.problem_id == "1"]
    phrase, gold = FIRST[name]
    assert first and all(phrase in r.prompt[-1].content and r.answer == gold for r in first)
    assert all(r.answer is not None for r in records)
    if name == "asdiv.jsonl":
        assert first[0].meta["answer_text"] == "9 (apples)"
    # the training prompt is mindgap's own prompt over the question: no system turn glued in
    assert first[0].prompt == solve_messages(read_problems(LAYOUTS / name, limit=1).problems[0].question)
    if name == "math_chat.jsonl":
        assert first[0].meta["system"].startswith("Please reason step by step")


def test_inspect_reads_a_saved_hf_dataset_with_a_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (LAYOUTS / "metamathqa.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "metamath"))
    result = invoke("inspect", tmp_path / "metamath", "--split", "test", "-n", "1")
    assert result.exit_code == 0, result.output
    assert "gold     ← 'response' answer phrase (1)" in result.output
    assert (
        "question: What is the sum of all positive divisors of 12?" in result.output and "gold:     28" in result.output
    )
    wrong = invoke("inspect", tmp_path / "metamath", "--split", "validation")
    assert wrong.exit_code == 2 and "choose a split with --split (available: train, test)" in wrong.output
