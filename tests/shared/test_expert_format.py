"""Expert demonstrations as written (`raw`, the default) or in the solve prompt's convention (`boxed`)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.config import StageParams
from shared.grading import extract_prediction
from shared.prompts import expert_text

GSM8K = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def test_raw_is_the_default_and_keeps_the_text() -> None:
    assert StageParams().expert_format == "raw"
    assert expert_text(GSM8K, "72", "72", "raw") == GSM8K
    assert expert_text(None, "72", "72", "raw") == "72"


def test_boxed_gsm8k_solution() -> None:
    text = expert_text(GSM8K, GSM8K, "72", "boxed")
    assert text == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n\\boxed{72}"
    )
    assert extract_prediction(text or "", strict=True) == "72"


@pytest.mark.parametrize(
    ("solution", "answer", "gold", "expected"),
    [
        ("So 1,000 in all.\n#### 1,000  ", None, "1000", "So 1,000 in all.\n\\boxed{1,000}"),
        (None, "72", "72", "\\boxed{72}"),  # an answer-only row: the bare answer, boxed
        (None, "['$\\frac{1}{2}$']", "\\frac{1}{2}", "\\boxed{\\frac{1}{2}}"),  # boxed as graded, not as stored
        ("Thus $x = \\boxed{3}$.", "3", "3", "Thus $x = \\boxed{3}$."),  # already in the convention
        ("A circle is round.", None, None, "A circle is round."),  # no final answer to box
        ("The #### is a heading, then 5.", None, "5", "The #### is a heading, then 5."),  # not a final ####
        (None, None, None, None),
    ],
)
def test_boxed_cases(solution: str | None, answer: str | None, gold: str | None, expected: str | None) -> None:
    assert expert_text(solution, answer, gold, "boxed") == expected


def test_unknown_format_is_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="expert_format"):
        StageParams.model_validate({"expert_format": "latex"})
