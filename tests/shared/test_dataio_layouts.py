"""The layouts public math SFT and evaluation sets come in, read with no mapping (fixtures in data/layouts/, one
small file per real public layout); templates, dotted paths, turns, gold conventions and units; and rows the
reader refuses rather than turn into something else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.dataio import (
    DataError,
    FieldMap,
    RowItem,
    is_hub_id,
    iter_rows,
    parse_field_specs,
    read_problems,
    read_problems_from_rows,
)
from shared.grading import extract_gold, find_gold
from shared.layouts import normalize_gold

LAYOUTS = Path(__file__).parent / "data" / "layouts"

# file → (question of the first row starts with, its solution ends with (None: no solution), its gold,
#         where the question / the gold came from)
EXPECTED: dict[str, tuple[str, str | None, str, str, str]] = {
    "gsm8k.jsonl": ("Natalia sold clips to 48", "#### 72", "72", "'question'", "'answer' ####"),
    "numinamath_cot.jsonl": (
        "What is the smallest positive",
        "$\\boxed{3}$.",
        "3",
        "'problem'",
        "'solution' \\boxed{}",
    ),
    "math_chat.jsonl": (
        "If $x + y = 10$",
        "$x = \\boxed{6}$.",
        "6",
        "'messages' user turn",
        "'messages' assistant turn \\boxed{}",
    ),
    "trl_conversational.jsonl": (
        "A rectangle is 3 cm wide",
        "$\\boxed{12}$.",
        "12",
        "'prompt' user turn",
        "'completion' assistant turn \\boxed{}",
    ),
    "trl_plain.jsonl": (
        "Solve for $x$: $2x + 3 = 11$.",
        "$x = \\boxed{4}$.",
        "4",
        "'prompt'",
        "'completion' \\boxed{}",
    ),
    "metamathqa.jsonl": (
        "Natalia sold clips to x of her friends",
        "The answer is: 48",
        "48",
        "'query'",
        "'response' answer phrase",
    ),
    "svamp.jsonl": ("Each pack of dvds costs 76 dollars.", None, "51", "'Body' + 'Question'", "'Answer'"),
    "asdiv.jsonl": ("Seven red apples and two green apples", None, "9", "'body' + 'question'", "'answer'"),
    "openmathinstruct2.jsonl": (
        "A bookstore sells 29 books",
        "$\\boxed{174}$ books.",
        "174",
        "'problem'",
        "'expected_answer'",
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_public_layout_reads_with_no_mapping(name: str) -> None:
    question, solution_end, gold, question_from, gold_from = EXPECTED[name]
    result = read_problems(LAYOUTS / name)
    assert result.errors == [] and result.ungradable == 0 and len(result.problems) >= 2
    first = result.problems[0]
    assert first.question.startswith(question)
    assert first.solution is None if solution_end is None else (first.solution or "").endswith(solution_end)
    assert first.answer == gold
    # one source for every row of a file, and no question is a JSON dump of something else
    assert dict(result.sources["question"]) == {question_from: len(result.problems)}
    assert dict(result.sources["gold"]) == {gold_from: len(result.problems)}
    assert all(not p.question.lstrip().startswith(("[", "{")) for p in result.problems)


def test_svamp_joins_body_and_question_and_drops_float_zeros() -> None:
    problems = read_problems(LAYOUTS / "svamp.jsonl").problems
    assert problems[0].question == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?"
    )
    assert [p.answer for p in problems] == ["51", "1"]  # Answer: 51.0, 1.0


def test_asdiv_units_are_stripped_and_the_written_answer_kept() -> None:
    problems = read_problems(LAYOUTS / "asdiv.jsonl").problems
    assert [(p.answer, p.meta.get("answer_text")) for p in problems] == [
        ("9", "9 (apples)"),
        ("12", "12 (cm)"),
        ("323", "323 (legos)"),
    ]


def test_system_turn_is_kept_apart_from_the_question() -> None:
    chat = read_problems(LAYOUTS / "math_chat.jsonl").problems
    assert chat[0].meta["system"].startswith("Please reason step by step")
    assert "reason step by step" not in chat[0].question
    trl = read_problems(LAYOUTS / "trl_conversational.jsonl").problems
    assert "system" not in trl[0].meta and trl[1].meta["system"] == "You are a careful tutor."
    assert trl[1].question == "How many minutes are in 2.5 hours?"


def test_hf_datasets_folder_of_a_public_layout(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (LAYOUTS / "math_chat.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "chat"))
    train = read_problems(tmp_path / "chat").problems
    assert [p.answer for p in train] == ["6", "\\frac{3}{4}"] and train[0].meta["system"]
    test = read_problems(tmp_path / "chat", split="test").problems
    assert [p.question for p in test] == ["What is $\\frac{1}{2} + \\frac{1}{4}$?"]


def test_hub_ids_load_through_datasets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple[Any, ...]] = []
    rows = [json.loads(line) for line in (LAYOUTS / "gsm8k.jsonl").read_text().splitlines()]

    def load_dataset(repo: str, config: str | None, split: str | None) -> Any:
        calls.append((repo, config, split))
        if repo == "nobody/nothing":
            raise ConnectionError("offline")
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert is_hub_id("openai/gsm8k") and is_hub_id("openai/gsm8k:main")
    assert not is_hub_id("data/train.jsonl") and not is_hub_id("/abs/path") and not is_hub_id("gsm8k")
    problems = read_problems("openai/gsm8k:main").problems
    assert calls == [("openai/gsm8k", "main", None)] and [p.answer for p in problems] == ["72", "10"]
    with pytest.raises(DataError, match=r"choose a split with --split \(available: train\)"):
        read_problems("openai/gsm8k", split="test")
    with pytest.raises(DataError, match="nobody/nothing: no such file or folder, and cannot load it from the"):
        list(iter_rows("nobody/nothing"))


# ------------------------------------------------------------------------------- mappings


def _rows(*rows: dict[str, Any]) -> list[RowItem]:
    return list(enumerate(rows, 1))


def test_templates_join_fields_and_name_a_missing_placeholder() -> None:
    fields = parse_field_specs(["question={Body} {Question}", "answer=Answer"])
    result = read_problems_from_rows(
        _rows(
            {"Body": "Tom has 3 apples.", "Question": "How many?", "Answer": 3},
            {"Question": "How many pears?", "Answer": 2},
            {"body": "lowercase keys match too.", "question": "Yes?", "answer": 1},
        ),
        fields,
    )
    assert [p.question for p in result.problems] == ["Tom has 3 apples. How many?", "lowercase keys match too. Yes?"]
    [error] = result.errors
    assert error.line == 2 and "no field 'Body'" in error.message and "question='{Body} {Question}'" in error.message
    assert dict(result.sources["question"]) == {"'{Body} {Question}'": 2}


def test_dotted_paths_reach_nested_fields_and_list_items() -> None:
    rows = _rows(
        {"q": {"text": "What is 6*7?"}, "meta": {"final": 42.0}, "steps": ["6*7", "= 42"]},
        {"q": {"text": "What is 2*2?"}, "meta": {"final": "4"}, "steps": ["2*2 = 4"]},
    )
    fields = parse_field_specs(["question=q.text", "answer=meta.final", "solution=steps.-1"])
    problems = read_problems_from_rows(rows, fields).problems
    assert [(p.question, p.answer, p.solution) for p in problems] == [
        ("What is 6*7?", "42", "= 42"),
        ("What is 2*2?", "4", "2*2 = 4"),
    ]


def test_an_unknown_path_is_a_file_error_naming_it() -> None:
    with pytest.raises(DataError, match=r"unknown field 'meta\.final' \(mapped to answer\)"):
        read_problems_from_rows(
            _rows({"question": "q", "extra": {"final": 1}}), parse_field_specs(["answer=meta.final"])
        )


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["question={Body"], "bad template"),
        (["question={}"], "placeholders are field names"),
        (["question={a!r}"], "placeholders are field names"),
        (["turn=0"], "turn is a user turn number"),
        (["turn=last"], "turn is a user turn number"),
        (["turn=1", "turn=2"], "mapped twice"),
    ],
)
def test_bad_templates_and_turns(specs: list[str], message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_field_specs(specs)


def test_field_map_round_trips_through_a_job_spec() -> None:
    fields = parse_field_specs(["question={Body} {Question}", "turn=-1"])
    assert fields == FieldMap(question="{Body} {Question}", turn=-1)
    assert parse_field_specs([f"{k}={v}" for k, v in fields.mapped().items()]) == fields


MULTI_TURN = {
    "messages": [
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "\\boxed{2}"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "\\boxed{4}"},
    ]
}


def test_multi_turn_is_refused_unless_a_turn_is_named() -> None:
    with pytest.raises(DataError, match="turn=-1") as info:
        read_problems_from_rows(_rows(MULTI_TURN))
    assert "line 1: 'messages' is a conversation of 2 user turns (user, assistant, user, assistant)" in str(info.value)
    last = read_problems_from_rows(_rows(MULTI_TURN), FieldMap(turn=-1)).problems[0]
    first = read_problems_from_rows(_rows(MULTI_TURN), FieldMap(turn=1)).problems[0]
    assert (last.question, last.solution, last.answer) == ("And 2+2?", "\\boxed{4}", "4")
    assert (first.question, first.answer) == ("What is 1+1?", "2")
    result = read_problems_from_rows(_rows({"question": "plain row"}, MULTI_TURN), FieldMap(turn=3))
    assert [str(e) for e in result.errors] == ["line 2: turn 3 asked for, but 'messages' has 2 user turns"]


def test_sharegpt_conversations_and_content_parts() -> None:
    rows = _rows(
        {"conversations": [{"from": "human", "value": "What is 3+4?"}, {"from": "gpt", "value": "\\boxed{7}"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 5+5?"}]}]},
    )
    problems = read_problems_from_rows(rows).problems
    assert [(p.question, p.solution, p.answer) for p in problems] == [
        ("What is 3+4?", "\\boxed{7}", "7"),
        ("What is 5+5?", None, None),
    ]


# -------------------------------------------------------------------------- refusals


GARBLED = [
    ({"prompt": [{"role": "system", "content": "Be brief."}]}, "'prompt' is a list of chat messages with no user turn"),
    ({"messages": [{"speaker": "user", "text": "hi"}]}, "'messages' message 1 has no role and content"),
    ({"messages": [{"role": "tool", "content": "{}"}]}, "has role 'tool': only system, user and assistant"),
    ({"messages": "user: what is 1+1?"}, "'messages' is not a list of chat messages"),
    ({"question": {"en": "What is 1+1?", "fr": "?"}}, "'question' is an object (en, fr), not text"),
    ({"question": [{"step": 1}]}, "'question' is a list of objects"),
    (
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "again"}]},
        "'completion' should hold one assistant message, holds: user",
    ),
    ({"question": "q", "answer": [{"role": "assistant", "content": "4"}]}, "'answer' is a list of chat messages"),
]


@pytest.mark.parametrize(("row", "message"), GARBLED, ids=[m[:40] for _, m in GARBLED])
def test_garbled_rows_are_refused_naming_line_and_content(row: dict[str, Any], message: str) -> None:
    good = {"question": "What is 2+2?", "answer": "4"}
    result = read_problems_from_rows(_rows(good, row))
    assert [p.question for p in result.problems] == ["What is 2+2?"]
    [error] = result.errors
    assert error.line == 2 and message in error.message, error.message


def test_no_readable_row_names_the_layout_and_the_mapping_that_fits() -> None:
    rows = _rows(
        {"id": 7, "text_of_problem": "Sam has 3 cats and buys 2 more. How many cats?", "ans": 5},
        {"id": 8, "text_of_problem": "What is 10 - 4?", "ans": 6},
    )
    with pytest.raises(DataError) as info:
        read_problems_from_rows(rows)
    message = str(info.value)
    assert "no row could be read as a problem (2 rows skipped: no question ×2)" in message
    assert "Line 1 has id (number), text_of_problem (text, 46 chars), ans (number)" in message
    assert "Map one: --fields question=text_of_problem" in message
    assert "First: line 1: row has no question" in message
    fixed = read_problems_from_rows(rows, parse_field_specs(["question=text_of_problem", "answer=ans"]))
    assert [p.answer for p in fixed.problems] == ["5", "6"]


# ------------------------------------------------------------------------------ gold


@pytest.mark.parametrize(
    ("answer", "solution", "gold", "field", "convention"),
    [
        (None, "x = 48.\nThe answer is: 48", "48", "solution", "answer phrase"),
        (None, "Work.\nAnswer: $\\frac{1}{2}$", "\\frac{1}{2}", "solution", "answer phrase"),
        (None, "Work.\nFinal answer: 12 apples.", "12", "solution", "answer phrase"),
        (None, "the answer is 5 if we misread it\nbut it is really 6", None, "", ""),
        ("step one\nstep two\nThe answer is: 9", None, "9", "answer", "answer phrase"),
        ("calc #### 1,000", None, "1000", "answer", "####"),
        ("145.0", None, "145.0", "answer", ""),
    ],
)
def test_gold_conventions(
    answer: str | None, solution: str | None, gold: str | None, field: str, convention: str
) -> None:
    found = find_gold(answer, solution)
    assert (None if found is None else tuple(found)) == ((gold, field, convention) if gold else None)
    assert extract_gold(answer, solution) == gold


@pytest.mark.parametrize(
    ("written", "gold"),
    [
        ("9 (apples)", "9"),
        ("$5", "5"),
        ("\\$5.50", "5.50"),
        ("12 cm", "12"),
        ("3 (miles per hour)", "3"),
        ("6 m^2", "6"),
        ("145.0", "145"),
        ("-3.00", "-3"),
        ("1,000", "1000"),
        ("20 %", "20%"),
        ("0.25", "0.25"),
        # left alone: not a plain number with a unit
        ("2 pi", "2 pi"),
        ("5 and 6", "5 and 6"),
        ("6 r 2", "6 r 2"),
        ("3, 4", "3, 4"),
        ("\\frac{3}{4}", "\\frac{3}{4}"),
        ("x = 5", "x = 5"),
        ("Tuesday", "Tuesday"),
    ],
)
def test_gold_normalisation(written: str, gold: str) -> None:
    assert normalize_gold(written) == gold
    assert normalize_gold(gold) == gold  # the pipeline re-reads a stored gold: it must not change again


def test_currency_and_unit_answers_in_a_dataset_keep_the_written_text() -> None:
    rows = _rows(
        {"question": "Cost?", "answer": "$5"},
        {"question": "Length?", "answer": "12 cm"},
        {"question": "How many?", "answer": 7},
        {"question": "Share?", "answer": "\\frac{1}{2}"},
    )
    problems = read_problems_from_rows(rows).problems
    assert [(p.answer, p.meta.get("answer_text")) for p in problems] == [
        ("5", "$5"),
        ("12", "12 cm"),
        ("7", None),
        ("\\frac{1}{2}", None),
    ]
