"""The guidance-dependence filter's signals as pure functions, and its counters in a job's status."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from services.guidance_filter import (
    MAX_OPERATORS,
    REASONS,
    GuidanceCheck,
    GuidanceLimits,
    addressed_phrase,
    answer_before_work,
    false_equation,
    guidance_context,
    limits_of,
    logprob_gain,
    other_answer,
    text_check,
    with_likelihood,
    worked_out,
)
from services.job_store import JobStore, outcome_counters
from services.pipeline import ProblemOutcome
from shared.config import StageParams
from shared.keys import Keys
from shared.schema import Problem
from shared.wire import JobSpec

QUESTION = "Janet has 16 eggs. She eats 3 and bakes with 4. How many eggs are left?"
SOLUTION = (
    "Janet starts with sixteen eggs and uses three for breakfast and four for baking, which leaves her with "
    "16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 9"
)
LIMITS = limits_of(StageParams())


def check(response: str, mode: str = "solution") -> GuidanceCheck:
    ctx = guidance_context(QUESTION, SOLUTION, "9", mode, 0.5)  # type: ignore[arg-type]
    return text_check(response, ctx, LIMITS)


CLEAN = "She eats 3 and bakes with 4, so she uses 3 + 4 = 7 eggs. Then 16 - 7 = 9 eggs are left. \\boxed{9}"


@pytest.mark.parametrize("mode", ["solution", "answer", "hint"])
def test_a_clean_solution_passes_every_text_signal(mode: str) -> None:
    result = check(CLEAN, mode)
    assert result.reason is None and result.answer_first is False
    assert result.echo_words < LIMITS.echo_words and result.copy_words < LIMITS.copy_words


@pytest.mark.parametrize(
    ("response", "mode"),
    [
        ("The correct final answer is 9, since 16 - 3 - 4 = 9. \\boxed{9}", "answer"),
        ("Now I write my own complete solution to the problem: 16 - 7 = 9. \\boxed{9}", "answer"),
        ("Do not mention or refer to the reference solution. 16 - 7 = 9, \\boxed{9}", "solution"),
    ],
)
def test_echoing_the_guided_prompt_is_rejected(response: str, mode: str) -> None:
    result = check(response, mode)
    assert result.reason == "echo" and result.echo_words >= LIMITS.echo_words


def test_words_the_plain_prompt_also_has_are_not_an_echo() -> None:
    # "reason step by step" and "put your final answer within" are in both prompts
    result = check("Let me reason step by step and put your final answer within a box: 16 - 7 = 9. \\boxed{9}")
    assert result.reason is None


def test_copying_the_solution_is_rejected_but_not_the_question_or_its_numbers() -> None:
    copied = (
        "Janet starts with sixteen eggs and uses three for breakfast and four for baking, which leaves 9. \\boxed{9}"
    )
    assert check(copied).reason == "copy" and check(copied).copy_words >= 12
    restated = "Janet has 16 eggs. She eats 3 and bakes with 4. How many eggs are left? 16 - 3 - 4 = 9. \\boxed{9}"
    assert check(restated).reason is None
    # in answer mode the body shown is the answer alone: there is nothing long to copy
    assert check(copied, "answer").copy_words == 0


@pytest.mark.parametrize(
    ("response", "first"),
    [
        ("9\n\nTo solve the problem, 16 - 3 - 4 = 9. \\boxed{9}", True),
        ("Since the answer is 9, we check: she uses 3 and 4, and 16 - 7 = 9. \\boxed{9}", True),
        ("There are 9 eggs left, because 16 - 3 - 4 = 9. \\boxed{9}", True),
        (CLEAN, False),
        ("She starts with 16, so after 3 and 4 she has 9 left: \\boxed{9}", False),
        ("Using both kinds of eggs she ends up with \\boxed{9}.", False),  # concludes with it: no work after
    ],
)
def test_answer_before_work(response: str, first: bool) -> None:
    assert answer_before_work(response, QUESTION, "9") is first


def test_answer_first_is_not_judged_when_the_answer_is_in_the_question_or_not_a_number() -> None:
    assert answer_before_work("4 eggs. 16 - 12 = 4", QUESTION, "4") is False  # 4 is a question number
    assert answer_before_work("x = 2, so 2 + 2 = 4", "Solve x + 2 = 4.", "x = 2") is False
    assert answer_before_work("1,000 more. 1,600 - 600 = 1,000", "Rotate 1600 of 600?", "1000") is True


@pytest.mark.parametrize(
    ("response", "wrong"),
    [
        # right arithmetic, in the forms responses write it
        ("16 - 3 - 4 = 9", None),
        ("3 + 4 = 7 eggs, then 16 - 7 = 9.", None),
        ("<<16-3-4=9>>9 eggs", None),
        ("2 + 3 * 4 = 14", None),  # × before +
        ("12 x 3 = 36, 2×4 = 8, 6 \\times 7 = 42, 9 \\div 3 = 3", None),
        ("$25 * 6 = $150 and 1,200 + 300 = 1,500", None),
        ("20 * 30% = 6", None),
        ("10 / 3 = 3.33", None),  # rounded to the digits written
        ("1 / 3 = 0.3", None),
        ("7 / 2 = 3.5", None),
        ("5 / 0 = 0", None),  # nothing to check against
        # not equations of plain numbers: never read
        ("-3 + 5 = 2", None),
        ("x2 + 1 = 5", None),
        ("2 * (3 + 4) = 14", None),
        ("(3 + 4) * 2 = 14", None),
        ("2^3 = 8", None),
        ("Step 1: 12 apples = 1 dozen", None),
        # wrong arithmetic: the first such equation is named
        ("I find the difference: 8 - 6 = 4. Then 4 - 6 = 2. The final answer is 2.", "8 - 6 = 4"),
        ("1. 12 x 3 = 36\n2. 36 / 4.5 = 7.5\n3. The answer is 8", "36 / 4.5 = 7.5"),
        ("1 + 1 + 1 + 1 = 10", "1 + 1 + 1 + 1 = 10"),
        ("1 / 2 * 2 = 4", "1 / 2 * 2 = 4"),
        ("1 / 3 = 0.5", "1 / 3 = 0.5"),
        ("$10 * 3 = $25", "$10 * 3 = $25"),
        # written result first: checked the same way, unless the chain goes on or comes from the left
        ("11 = 5 + 6", None),
        ("So 11 = 11/5.", "11 = 11/5"),
        ("Alternatively, 11 = 11 / 5\n\nThis is the final answer.", "11 = 11 / 5"),
        ("5 + 6 = 11 = 6 + 5", None),
        ("x = 5 + 6", None),
        ("11 = 5 + 6 * 2", "11 = 5 + 6 * 2"),
        ("11 = 5 + 6 (the two bags)", None),  # a bracket may continue the expression: not read
        # an equality in words
        ("Since 42 is indeed 13, we conclude that Hugo has 13 coins.", "42 is indeed 13"),
        ("6 * 7 equals 13.", "6 * 7 equals 13"),
        ("6 * 7 equals 42, and 42 is the same as 42.", None),
        ("7 + 6 is equal to 13", None),
        ("30 plus 28 plus 32 plus 34 plus 26 equals 150", None),  # the sum is in words: not read
        ("150 divided by 5 equals 30", None),
        ("Since 4/7 is equal to $24, 1/7 is equal to $6.", None),  # a share of something, not a number
        ("80% is equal to $500", None),
        ("There are 3 apples. The answer is 13.", None),
    ],
)
def test_false_equation(response: str, wrong: str | None) -> None:
    assert false_equation(response) == wrong


def test_a_chain_is_read_over_at_most_max_operators() -> None:
    # Unbounded, every start position of a long chain scans to its end: 4,000 terms (max_tokens 8192)
    # took 1.7 s. Bounded, a longer chain is read from its last MAX_OPERATORS + 1 terms.
    chain = " + ".join(["1"] * 4000)
    assert false_equation(chain) is None
    assert false_equation(chain + " = 7") == " + ".join(["1"] * (MAX_OPERATORS + 1)) + " = 7"
    assert false_equation(" + ".join(["1"] * (MAX_OPERATORS + 1)) + " = 21") is None


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "text",
    [
        "1" * 30_000,
        "1," * 15_000,
        "1,000," * 5_000,
        "$1" * 10_000,
        "= " * 15_000,
        "2 = 1 + 1 " * 3_000,
        "1 + 1 equals 2 " * 2_000,
    ],
)
def test_the_text_signals_read_number_runs_in_linear_time(text: str) -> None:
    # An operand of `\d[\d,]*` started again at every comma of "1,1,1,…": 36 s for 30,000 characters
    # (a degenerate sample can be that long), on the service's event loop. Now milliseconds.
    assert false_equation(text) is None
    assert worked_out(text, QUESTION, "9") is False
    assert answer_before_work(text, QUESTION, "9") is False


def test_wrong_arithmetic_that_lands_on_the_answer_is_rejected() -> None:
    # The gold answer 9 reached through a wrong step: it came from the guidance, not the working.
    result = check("She uses 3 + 4 = 8 eggs. So 16 - 8 = 9 eggs are left. \\boxed{9}", "answer")
    assert result.reason == "arithmetic" and result.false_equation == "3 + 4 = 8"
    assert check(CLEAN).false_equation is None


@pytest.mark.parametrize(
    ("response", "worked"),
    [
        # the answer is the result of an expression, in the forms responses write it
        (CLEAN, True),
        ("16 - 3 - 4 = 9", True),
        ("She has 16 - 7 = 9.", True),  # a sentence's full stop after the result
        ("(3 + 4) is 7, and 16 - 7 equals 9 eggs", True),
        ("16 - 7 gives 9, 16 - 7 makes 9", True),
        ("So 16 - 3 - 4 = \\boxed{9}.", True),
        ("<<16-3-4=9>>9 eggs", True),
        ("16 - 7 = 9.0 eggs", True),
        ("3^2 = 9, \\sqrt{81} = 9, x = 9", True),  # whatever the left side, a result of its own
        # stated, not worked out
        ("The answer is 9.", False),
        ("She has 9 eggs left. \\boxed{9}", False),
        ("She uses 3 + 4 = 7 eggs, so \\boxed{9} are left.", False),  # working, but not to the answer
        ("16 - 7 = 90 eggs", False),  # 90 is not 9
        ("16 - 7 = 9.5 eggs", False),
        ("A story about eggs. The answer is = 9", False),  # an answer phrase and a bare `=`
        ("Final answer: = 9", False),
        ("The eggs left are = 9", False),
        ("The answer is 16 - 7 = 9", True),  # an answer phrase, then working
        ("The answer is x = 9", True),
        ("Using both kinds of eggs she ends up with \\boxed{9}.", False),  # prose: the signal's price
    ],
)
def test_worked_out(response: str, worked: bool) -> None:
    assert worked_out(response, QUESTION, "9") is worked


def test_a_negative_answer_is_worked_out_with_its_sign() -> None:
    question = "The temperature is 2 degrees and falls by 5. What is it now?"
    assert worked_out("2 - 5 = -3, so it is \\boxed{-3} degrees.", question, "-3") is True
    assert worked_out("2 - 5 = 3, so it is \\boxed{-3} degrees.", question, "-3") is False


def test_worked_out_is_not_judged_when_the_answer_is_in_the_question_or_not_a_number() -> None:
    assert worked_out("The answer is 4.", "She has 4 eggs and 0 more. How many?", "4") is True
    assert worked_out("The answer is x = 2.", "Solve x + 2 = 4.", "x = 2") is True


def test_an_answer_that_is_not_worked_out_is_rejected() -> None:
    result = check("Janet has \\boxed{9} eggs left.", "answer")
    assert result.reason == "unworked" and result.unworked is True and result.answer_first is False
    assert check(CLEAN).unworked is False


@pytest.mark.parametrize(
    ("response", "gold", "other"),
    [
        ("I'd like to start with 4+2 = 6. The answer is 2.\n\nHowever, 4 + 2 = 6.\n\nFinal answer: 6", "6", "2"),
        ("\\boxed{5}, no: 2 + 4 = 6, so \\boxed{6}", "6", "5"),
        ("2 + 4 = 6. The answer is 6 eggs. \\boxed{6}", "6", None),
        ("2 + 4 = 6\n#### 6", "6", None),
        ("It is 2 + 4 = 6. The answer is: \\boxed{6}.", "6.0", None),  # the same number
        ("1,000 - 200 = 800. The answer is 800.", "800", None),
        ("The answer is x = 3, so \\boxed{3}", "3", None),  # not a plain number: not compared
        ("Half of it. The answer is \\frac{1}{2}", "\\frac{1}{2}", None),  # gold not a plain number
    ],
)
def test_other_answer(response: str, gold: str, other: str | None) -> None:
    assert other_answer(response, gold) == other


def test_a_response_stating_another_answer_is_rejected() -> None:
    result = check("She uses 3 + 4 = 7 eggs. The answer is 7. So 16 - 7 = 9 are left. \\boxed{9}", "answer")
    assert result.reason == "other_answer" and result.other_answer == "7"
    assert check(CLEAN).other_answer is None


@pytest.mark.parametrize(
    ("response", "phrase"),
    [
        ("16 - 7 = 9. Your solution is correct, you have correctly applied it. \\boxed{9}", "Your solution"),
        ("I made a clever error in the original solution. 16 - 7 = 9, \\boxed{9}", "the original solution"),
        ("16 - 7 = 9. Same logic as your previous step. \\boxed{9}", "your previous step"),
        ("16 - 7 = 9. You can return to the original code to complete it. \\boxed{9}", "the original code"),
        ("16 - 7 = 9, \\boxed{9}. You're right about the eggs.", "You're right"),
        ("16 - 7 = 9, as you provided. \\boxed{9}", "you provided"),
        # an answer or value shown, a response before this one, a verdict on what was handed over
        ("16 - 7 = 9. The original answer is 9. \\boxed{9}", "The original answer"),
        ("16 - 7 = 9, which matches the given value. \\boxed{9}", "the given value"),
        ("16 - 7 = 9. Given the answer 9. \\boxed{9}", "Given the answer"),
        ("16 - 7 = 9\nNo need to revise my previous response. \\boxed{9}", "my previous response"),
        ("The problem you are referring to: 16 - 7 = 9. \\boxed{9}", "you are referring"),
        ("This is a valid answer. 16 - 7 = 9. \\boxed{9}", "This is a valid answer"),
        # nothing shown is referred to: the plain prompt's own words, a solution's own steps, a label
        ("16 - 7 = 9. Put your final answer within a box: \\boxed{9}", None),
        ("From the previous step, 16 - 7 = 9. \\boxed{9}", None),
        ("16 - 7 = 9\nYour answer: 9", None),
        ("You have 16 eggs and use 7: 16 - 7 = 9. \\boxed{9}", None),
        ("The initial value is 16 eggs; the given information says 7 are used: 16 - 7 = 9. \\boxed{9}", None),
    ],
)
def test_addressed_phrase(response: str, phrase: str | None) -> None:
    plain = guidance_context(QUESTION, SOLUTION, "9", "answer", 0.5).plain_text
    assert addressed_phrase(response, plain) == phrase


def test_a_response_addressing_the_guidance_is_rejected() -> None:
    result = check("She uses 3 + 4 = 7 eggs and 16 - 7 = 9 are left. Your solution is right. \\boxed{9}", "answer")
    assert result.reason == "addresses" and result.addresses == "Your solution"
    assert check(CLEAN).addresses is None


def test_likelihood_gain_is_the_mean_per_token_difference() -> None:
    assert logprob_gain([-2.0, -4.0], [-1.0, -1.0], 8) == pytest.approx(2.0)  # shorter than a window: all of it
    # a leaning stretch of 2 tokens in 10: diluted over the whole response, plain in a window of 2
    plain, guided = [-1.0] * 10, [-1.0] * 4 + [0.0, 0.0] + [-1.0] * 4
    assert logprob_gain(plain, guided, 10) == pytest.approx(0.2)
    assert logprob_gain(plain, guided, 2) == pytest.approx(1.0)
    assert logprob_gain(plain, guided, 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="aligned"):
        logprob_gain([-1.0], [-1.0, -2.0], 8)
    clean = check(CLEAN)
    assert with_likelihood(clean, 0.1, LIMITS).reason is None
    assert with_likelihood(clean, LIMITS.max_logprob_gain + 0.01, LIMITS).reason == "likelihood"  # type: ignore[operator]
    # a text reason stays the reason; the gain is still recorded
    echoed = check("The correct final answer is 9, since 16 - 3 - 4 = 9.", "answer")
    assert with_likelihood(echoed, 3.0, LIMITS).reason == "echo"


def test_limits_switch_signals_off() -> None:
    off = GuidanceLimits(
        echo_words=0,
        copy_words=0,
        answer_first=False,
        arithmetic=False,
        unworked=False,
        addresses=False,
        other_answer=False,
        max_logprob_gain=None,
        gain_window=8,
    )
    ctx = guidance_context(QUESTION, SOLUTION, "9", "answer", 0.5)
    assert text_check("The correct final answer is 9. So 16 - 7 = 9.", ctx, off).reason is None
    assert text_check("She uses 3 + 4 = 8 eggs, so 9 are left. \\boxed{9}", ctx, off).reason is None
    assert text_check("She has \\boxed{9} eggs left.", ctx, off).reason is None
    assert text_check("16 - 7 = 9 as your solution says. \\boxed{9}", ctx, off).reason is None
    assert text_check("The answer is 7. 16 - 7 = 9, \\boxed{9}", ctx, off).reason is None
    assert with_likelihood(text_check(CLEAN, ctx, off), 5.0, off).reason is None


def test_meta_is_plain_rounded_data() -> None:
    meta = with_likelihood(check(CLEAN), 0.123456789, LIMITS).to_meta()
    assert meta == {
        "echo_words": meta["echo_words"],
        "copy_words": meta["copy_words"],
        "answer_first": False,
        "false_equation": None,
        "unworked": False,
        "addresses": None,
        "other_answer": None,
        "logprob_gain": 0.1235,
        "reason": None,
    }


@pytest.mark.redis
async def test_rejections_per_reason_reach_the_job_status(redis_url: str, key_prefix: str) -> None:
    r = aioredis.from_url(redis_url)
    store = JobStore(r, Keys(key_prefix), ttl_s=60)
    problems = [Problem(id=str(i), question=f"What is {i}+1?", answer=str(i + 1)) for i in range(2)]
    job = (await store.create(problems, [], JobSpec(), StageParams(), chunk_size=2)).id
    first, second = (ProblemOutcome(problem=p) for p in problems)
    first.guidance_rejected |= {"echo": 2, "likelihood": 1}
    second.guidance_rejected |= {"echo": 1}
    counters = outcome_counters([first, second])
    assert counters["g:echo"] == 3 and counters["g:likelihood"] == 1 and "g:copy" not in counters
    await store.commit_chunk(job, "0:0", counters)
    status = await store.status(job)
    assert status is not None
    assert status.guidance_rejected == {
        "echo": 3,
        "copy": 0,
        "answer_first": 0,
        "arithmetic": 0,
        "unworked": 0,
        "addresses": 0,
        "other_answer": 0,
        "likelihood": 1,
    }
    assert tuple(status.guidance_rejected) == REASONS
    await r.aclose()
