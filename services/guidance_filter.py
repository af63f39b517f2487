"""The guidance-dependence filter: whether a correct guided response stands on its own.

A guided response is trained on under the plain prompt, as if the policy had solved the problem. One
that leans on the guidance it was shown teaches the wrong thing, so stage 2 rejects it. Eight signals,
each a pure function here, with thresholds in `StageParams` (defaults measured on the labelled set in
experiments/guidance_filter/, see docs/rewrite.md):

- `echo`: the response repeats the guided prompt's own wording (the guidance's framing, e.g. "The
  correct final answer is", and the guided instruction, e.g. "write your own complete solution") for
  `guidance_echo_words` or more consecutive words that the plain prompt does not contain.
- `copy`: it copies `guidance_copy_words` or more consecutive words of the reference solution or hint
  shown (spans that also occur in the question do not count).
- `answer_first`: it states the gold answer first and works towards it afterwards: no equation,
  operator or number of the question comes before the answer's first appearance, and one comes after it
  ("15 To solve the problem, 7 + 8 = 15…", "Since the answer is 10, 3 + 7…"). A response that only
  concludes with its answer ("Adding two and three gives 5.") is not caught. Checked for numeric gold
  answers that do not occur in the question.
- `arithmetic`: it writes an equation whose arithmetic is wrong ("8 - 6 = 4", "36 / 4.5 = 7.5", result
  first "11 = 11/5", in words "42 is indeed 13") and still lands on the gold answer: the answer did not
  come from its own working, so it came from the guidance (measured: 4 of the 9 guided responses the
  other signals kept in a GSM8K spot run, and none of the 40 correct labelled responses; the two later
  forms 2 of the 20 leaning responses the seven other signals kept in three labelled arithmetic runs,
  none of the 48 clean ones, none of 7,473 human GSM8K solutions, 2 of the model's 160 correct
  self-stage responses, which do write "7 = 8 + 1" and "15 = 6 + 2 * 9"). Only chains of numbers and
  + - * x × / ÷ without brackets are checked, each against the precision its result is written with
  ("10 / 3 = 3.33" holds).
- `unworked`: the gold answer is never the result of the response's own working: it follows no `=`
  ("16 - 7 = 9", "3^2 = 9", "x = 9", "= \\boxed{9}") and no expression `a op b …` followed by "is",
  "equals", "gives" or "makes" ("16 - 7 gives 9"); a bare `=` right after an answer phrase ("The answer
  is = 14") states the answer and derives nothing. "The answer is 14." alone, or "Tara now has 9
  stickers." after no sum, is caught. Checked, like `answer_first`, for numeric gold answers that do not
  occur in the question. Measured on an arithmetic run's kept guided responses: 8 of the 18 that lean
  rejected, 1 of the 19 that do not (docs/rewrite.md). Its price: an answer reached in words or by
  counting ("Adding two and three gives 5.", "2, 3, 5 and 7: four primes") is rejected too.
- `addresses`: it talks about a solution it was shown, or to its author: "your solution", "your previous
  step", "the original/given/provided/reference/initial/incomplete solution|code|work|attempt|response|
  step(s)|calculation|reasoning|approach|method", "you (have) correctly/already/provided/given/made/
  wrote/solved/calculated/shown", "you're right/correct" ("Your solution is correct, you have correctly
  applied…", "I made a clever error in the original solution"); an answer, value, example or hint it was
  handed ("the original answer", "the given value", "given the answer"), a response before this one ("my
  previous response"), "you are referring/mentioned/gave", a verdict on an answer ("this is a valid
  answer"). Under the plain prompt the user showed no solution and there was no earlier response, so
  there is nothing such a phrase could refer to; phrases the plain prompt itself contains do not count.
  "Your answer" is not on the list (the plain prompt asks for "your final answer", and the model writes
  "Your answer: 13" as a label), nor "the previous step" (a solution's own steps), nor "the initial/
  original value" (GSM8K solutions use it of the problem's quantities). Measured on the responses the
  other signals keep in two arithmetic runs: 6 of the 18 that lean rejected, none of the 32 that do not;
  it fires on none of 1,000 human GSM8K solutions and on 1 of 60 of the model's own correct responses to
  the plain prompt. The second group of wordings, read off two later live runs, rejects 6 of the 9
  references to the guidance those runs kept and none of their clean responses, fires on none of 7,473
  GSM8K solutions and on 1 of 160 self responses (experiments/guidance_filter/references.txt,
  docs/rewrite.md).
- `other_answer`: it states an answer (`\\boxed{}` or an answer phrase, as grading reads them) that is a
  number other than the numeric gold one it was graded on ("The answer is 2. … Final answer: 6"): it
  contradicts itself, so the answer it ends on did not come from the working before it. Measured: 1 of
  the 20 leaning responses kept in the same three runs, none of the 48 clean ones, none of 7,473 human
  GSM8K solutions, 1 of 160 of the model's own correct responses to the plain prompt (one that does
  contradict itself: "6 + 7 = 11 + 1 = 22. The answer is 22. … the final answer is 13").
- `likelihood`: some stretch of `guidance_gain_window` consecutive tokens is on average more than
  `guidance_max_logprob_gain` nats more likely after the guided prompt than after the plain one, both
  scored at temperature 1: that part only makes sense with the guidance in view ("Using the given
  answer", "Your response is incomplete"). A window, not the whole response: a leaning phrase is a few
  tokens of a long response, and its mean over every token is diluted (measured: the windowed gain
  separates the labelled responses better). This one needs two scoring passes, so it runs last and only
  for responses the text signals pass.

Words are lower-case alphabetic runs: numbers, symbols, LaTeX commands and GSM8K calculator notes are
dropped, so restating the problem's numbers never counts as an echo or a copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from shared.config import GuidanceMode, StageParams
from shared.grading import stated_answers
from shared.prompts import guided_messages, hint_prefix, solve_messages

GuidanceReason = Literal[
    "echo", "copy", "answer_first", "arithmetic", "unworked", "addresses", "other_answer", "likelihood"
]
REASONS: tuple[GuidanceReason, ...] = (
    "echo",
    "copy",
    "answer_first",
    "arithmetic",
    "unworked",
    "addresses",
    "other_answer",
    "likelihood",
)

_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")
# What counts as work before an answer: an equation or an operator between operands.
_WORK = re.compile(r"=|[+*/×÷^]|\d\s*[-x]\s*\d|\\(?:times|cdot|div|frac|dfrac|sqrt)\b")
# The `arithmetic` signal's equations: a bracket-free chain `a op b [op c …] = r` of plain numbers
# ($, thousands commas and % allowed). A chain that starts mid-number, after a minus sign or a letter
# ("-3 + 5", "x2 + 1") is not read, nor a result glued to letters. Commas only in groups of three, and
# no start right after a digit or comma: a looser operand (`\d[\d,]*`) rescanned "1,1,1,…" from every
# comma, 36 s for 30,000 characters.
_OPERAND = r"\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?"
_OPERATOR = r"[-+*/×÷x]|\\times|\\cdot|\\div"
# At most MAX_OPERATORS per chain: each start position then scans a bounded stretch, so a response of
# thousands of "1 + 1 + …" costs linear time, not quadratic (a longer chain is read from its last terms).
MAX_OPERATORS = 20
_EXPRESSION = rf"{_OPERAND}(?:\s*(?:{_OPERATOR})\s*{_OPERAND}){{1,{MAX_OPERATORS}}}"
_START = r"(?<![\w.,$/-])"  # not mid-number, nor after a minus sign or a letter
_EQUATION = re.compile(rf"{_START}({_EXPRESSION})\s*=\s*({_OPERAND})(?!\w)")
# The same chain written result first ("11 = 11/5"), and a number or chain said in words to equal a number
# ("42 is indeed 13", "6 * 7 equals 13"). Nothing that continues the chain may follow the right side (an
# operator, `=`, a bracket, more digits), and `_CONTINUED` checks the left side starts the statement.
_END = rf"(?!\w|\.\d|\s*(?:=|{_OPERATOR}|\(|\^))"
_REVERSED = re.compile(rf"{_START}({_OPERAND})\s*=\s*({_EXPRESSION}){_END}")
_CLAIM = re.compile(
    rf"{_START}({_OPERAND}(?:\s*(?:{_OPERATOR})\s*{_OPERAND}){{0,{MAX_OPERATORS}}})"
    rf"\s+(?:equals|is\s+equal\s+to|is\s+indeed|is\s+the\s+same\s+as)\s+({_OPERAND}){_END}",
    re.IGNORECASE,
)
# the left side continues an expression, in symbols or words ("30 plus 28 plus 26 equals 84")
_CONTINUED = re.compile(rf"(?:=|{_OPERATOR}|\(|\b(?:plus|minus|times|by|of|and))\s*$", re.IGNORECASE)
# a lone fraction, or a percentage, said to equal an amount names a share of something ("4/7 is equal to
# $24": of her money; "80% is equal to $500")
_FRACTION = re.compile(rf"{_OPERAND}\s*/\s*{_OPERAND}")
_TOKEN = re.compile(rf"{_OPERAND}|{_OPERATOR}")
# The `unworked` signal's derivations: `=`, or an expression (a closing bracket may end it) and a verb of
# result, then the result, possibly boxed or negative: "= 9", "= \\boxed{9}", "(3 + 4) is 7", "2 - 5 = -3".
_DERIVATION = re.compile(
    rf"(?:{_START}{_EXPRESSION}\)?\s*(?:equals|is equal to|is|gives|makes)|=)"
    rf"\s*(?:\\boxed\{{)?\s*(-?{_OPERAND})(?!\d|\.\d)"  # a negative result keeps its sign
)
# An answer phrase right before a bare `=`: "The answer is = 14" states the answer, it works nothing out.
_ANSWER_PHRASE_END = re.compile(r"(?:\bis|\bare|\banswer|:)\s*$", re.IGNORECASE)
_MULTIPLY = {"*", "x", "×", "\\times", "\\cdot"}


@dataclass(frozen=True)
class GuidanceContext:
    """What a guided response is checked against: the two prompts' texts and what the guidance showed."""

    question: str
    plain_text: str  # the plain prompt's user text
    guided_text: str  # the guided prompt's user text
    shown: str  # the guidance body: the reference solution, the hint, or the answer
    gold: str


@dataclass(frozen=True)
class GuidanceLimits:
    """The filter's thresholds (`StageParams.guidance_*`); 0 or None turns a signal off."""

    echo_words: int
    copy_words: int
    answer_first: bool
    arithmetic: bool
    unworked: bool
    addresses: bool
    other_answer: bool
    max_logprob_gain: float | None
    gain_window: int


@dataclass(frozen=True)
class GuidanceCheck:
    """The filter's scores for one response and the first reason it is rejected (None: kept)."""

    echo_words: int  # longest run of the guided prompt's own wording repeated
    copy_words: int  # longest run of the guidance body copied
    answer_first: bool  # the gold answer stated before any work
    false_equation: str | None = None  # the first equation with wrong arithmetic
    unworked: bool = False  # the gold answer is the result of no expression in the response
    addresses: str | None = None  # the first phrase that refers to a solution shown, or to its author
    other_answer: str | None = None  # the first answer the response states that is not the gold one
    logprob_gain: float | None = None  # largest windowed mean of log p(guided) - log p(plain); None: not scored
    reason: GuidanceReason | None = None

    def to_meta(self) -> dict[str, Any]:
        """The check as the record's `meta.guidance_check`."""
        meta = asdict(self)
        if self.logprob_gain is not None:
            meta["logprob_gain"] = round(self.logprob_gain, 4)
        return meta


def guidance_context(
    question: str, solution: str | None, gold: str, mode: GuidanceMode, hint_fraction: float
) -> GuidanceContext:
    """The context of a problem's guided prompt, built as stage 2 builds it (same fallbacks)."""
    guided = guided_messages(question, solution, gold, mode, hint_fraction)[0].content
    if mode == "solution" and solution:
        shown = solution.strip()
    elif mode == "hint" and solution:
        shown = hint_prefix(solution, hint_fraction)
    else:
        shown = gold
    return GuidanceContext(question, solve_messages(question)[0].content, guided, shown, gold)


def limits_of(params: StageParams) -> GuidanceLimits:
    """The filter's limits from a job's stage parameters."""
    return GuidanceLimits(
        echo_words=params.guidance_echo_words,
        copy_words=params.guidance_copy_words,
        answer_first=params.guidance_answer_first,
        arithmetic=params.guidance_arithmetic,
        unworked=params.guidance_unworked,
        addresses=params.guidance_addresses,
        other_answer=params.guidance_other_answer,
        max_logprob_gain=params.guidance_max_logprob_gain,
        gain_window=params.guidance_gain_window,
    )


def words(text: str) -> list[str]:
    """The prose words of `text`, lower case (see the module docstring)."""
    text = re.sub(r"<<[^<>]*>>", " ", text)
    text = re.sub(r"\\[a-zA-Z]+", " ", text)
    return re.findall(r"[a-z]+", text.lower())


def _spans(segments: Iterable[Sequence[str]], n: int) -> set[tuple[str, ...]]:
    return {tuple(seg[i : i + n]) for seg in segments for i in range(len(seg) - n + 1)}


def longest_shared_span(
    response: Sequence[str], source: Sequence[Sequence[str]], exclude: Sequence[Sequence[str]] = ()
) -> int:
    """The most consecutive words of `response` that occur together in a segment of `source` but not
    in any segment of `exclude`."""
    longest = max((len(seg) for seg in source), default=0)
    for n in range(min(longest, len(response)), 0, -1):
        shared = _spans([response], n) & _spans(source, n)
        if shared - _spans(exclude, n):
            return n
    return 0


def _framing(ctx: GuidanceContext) -> list[list[str]]:
    """The guided prompt's own words: its text with the question and the guidance body cut out."""
    text = ctx.guided_text
    for part in (ctx.question.strip(), ctx.shown.strip()):
        if part:
            text = text.replace(part, "\x00")
    return [words(seg) for seg in text.split("\x00")]


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def _has_work(text: str, question_numbers: set[float]) -> bool:
    numbers = (_as_number(m.group(0)) for m in _NUMBER.finditer(text))
    return _WORK.search(text) is not None or any(v in question_numbers for v in numbers)


def _question_numbers(question: str) -> set[float]:
    return {v for m in _NUMBER.finditer(question) if (v := _as_number(m.group(0))) is not None}


def _judged_answer(question_numbers: set[float], gold: str) -> float | None:
    """`gold` as a number when `answer_first` and `unworked` can judge it: numeric and not one of the
    question's numbers (a restated question number cannot be told from a stated answer); else None."""
    target = _as_number(gold)
    return None if target is None or target in question_numbers else target


def _stated_first(response: str, target: float, question_numbers: set[float]) -> bool:
    first = next((m for m in _NUMBER.finditer(response) if _as_number(m.group(0)) == target), None)
    if first is None:
        return False
    return not _has_work(response[: first.start()], question_numbers) and _has_work(
        response[first.end() :], question_numbers
    )


def _same_number(value: float, target: float) -> bool:
    return abs(value - target) <= 1e-9 * max(1.0, abs(target))


def _derives(response: str, target: float) -> bool:
    return any(
        _same_number(_operand(m.group(1)), target)
        and not (m.group(0).startswith("=") and _just_before(_ANSWER_PHRASE_END, response, m.start()))
        for m in _DERIVATION.finditer(response)
    )


def _just_before(pattern: re.Pattern[str], response: str, start: int) -> bool:
    """Whether `pattern` (anchored at its end) matches the text of `response` right before `start`."""
    return pattern.search(response[max(0, start - 16) : start]) is not None


def answer_before_work(response: str, question: str, gold: str) -> bool:
    """Whether `response` states the numeric `gold` before the work that leads to it (module docstring)."""
    numbers = _question_numbers(question)
    target = _judged_answer(numbers, gold)
    return target is not None and _stated_first(response, target, numbers)


def _operand(text: str) -> float:
    value = float(text.replace("$", "").replace(",", "").rstrip("%"))
    return value / 100 if text.endswith("%") else value


def _evaluate(tokens: Sequence[str]) -> float | None:
    """`a op b op …` with the usual precedence (× and ÷ before + and −); None on a division by zero."""
    terms: list[float] = [_operand(tokens[0])]
    signs: list[str] = []
    for op, text in zip(tokens[1::2], tokens[2::2], strict=True):
        value = _operand(text)
        if op in _MULTIPLY:
            terms[-1] *= value
        elif op in ("+", "-"):
            signs.append(op)
            terms.append(value)
        elif value == 0:  # ÷, /
            return None
        else:
            terms[-1] /= value
    total = terms[0]
    for sign, term in zip(signs, terms[1:], strict=True):
        total = total + term if sign == "+" else total - term
    return total


def false_equation(response: str) -> str | None:
    """The first equation of `response` whose arithmetic is wrong, or None (module docstring: `arithmetic`):
    `a op b = r`, then `r = a op b`, then an equality in words.

    A result counts as right when it matches to the precision it is written with: "10 / 3 = 3.33" and
    "7 / 2 = 3.5" hold, "1 / 3 = 0.5" does not.
    """
    for m in _EQUATION.finditer(response):
        if _wrong(m.group(1), m.group(2)):
            return m.group(0)
    for m in _REVERSED.finditer(response):
        if not _just_before(_CONTINUED, response, m.start()) and _wrong(m.group(2), m.group(1)):
            return m.group(0)
    for m in _CLAIM.finditer(response):
        left, right = m.group(1), m.group(2)
        share = _FRACTION.fullmatch(left) is not None or left.endswith("%") != right.endswith("%")
        if not share and not _just_before(_CONTINUED, response, m.start()) and _wrong(left, right):
            return m.group(0)
    return None


def _wrong(expression: str, result: str) -> bool:
    """Whether `expression` does not come to the written `result` at the precision `result` is written with."""
    value = _evaluate(_TOKEN.findall(expression))
    if value is None:
        return False
    decimals = len(result.rstrip("%").partition(".")[2])
    tolerance = 0.5 * 10.0**-decimals * (0.01 if result.endswith("%") else 1.0)
    return abs(value - _operand(result)) > tolerance + 1e-9 * abs(value)


_SHOWN = re.compile(
    r"\b(?:your|the\s+(?:original|given|provided|reference|initial|incomplete))\s+"
    r"(?:(?:own|final|previous|first|current)\s+)?"
    r"(?:solution|code|work|attempt|response|steps?|calculation|reasoning|approach|method)\b"
    # an answer shown, not "your answer" (the plain prompt's word). "The initial/original value" is
    # left out: GSM8K solutions use it of the problem's quantities.
    r"|\bthe\s+(?:original|given|provided|reference|initial|incomplete)\s+(?:answer|example|hint)s?\b"
    r"|\bthe\s+(?:given|provided|reference)\s+(?:value|result)s?\b"
    r"|\bgiven\s+the\s+(?:answer|solution)\b"
    # a response before this one: under the plain prompt there was none
    r"|\bmy\s+(?:previous|earlier|original|last|first)\s+(?:response|answer|solution|attempt|reply|work)\b"
    # a verdict on an answer or solution as if handed one to judge
    r"|\b(?:this|that)\s+is\s+a\s+(?:valid|correct|right|good)\s+(?:answer|solution)\b",
    re.IGNORECASE,
)
_AUTHOR = re.compile(
    r"\byou(?:'ve|\s+have)?\s+(?:correctly|already|provided|given|made|wrote|written|solved|calculated|shown)\b"
    r"|\byou(?:'re|\s+are)\s+(?:right|correct)\b"
    r"|\byou(?:'re|\s+are)?\s+(?:referring|referred|mentioned|mentioning|gave)\b",
    re.IGNORECASE,
)


def addressed_phrase(response: str, plain_text: str) -> str | None:
    """The first phrase of `response` about a solution shown to it or about its author (module docstring:
    `addresses`), skipping phrases the plain prompt `plain_text` itself contains; None when there is none."""
    plain = " ".join(plain_text.lower().split())
    found = [m for m in _SHOWN.finditer(response) if " ".join(m.group(0).lower().split()) not in plain]
    found += list(_AUTHOR.finditer(response))
    return min(found, key=lambda m: m.start()).group(0) if found else None


def other_answer(response: str, gold: str) -> str | None:
    """The first answer `response` states (`\\boxed{}` or an answer phrase, shared.grading) that is a number
    other than the numeric `gold`, or None (module docstring: `other_answer`)."""
    target = _as_number(gold)
    if target is None:
        return None
    for stated in stated_answers(response):
        value = _as_number(stated)
        if value is not None and not _same_number(value, target):
            return stated
    return None


def worked_out(response: str, question: str, gold: str) -> bool:
    """Whether the numeric `gold` is the result of an expression in `response` (module docstring: `unworked`);
    True when the signal cannot judge `gold`."""
    target = _judged_answer(_question_numbers(question), gold)
    return target is None or _derives(response, target)


def text_check(response: str, ctx: GuidanceContext, limits: GuidanceLimits) -> GuidanceCheck:
    """The text signals of `response` and the first one over its limit."""
    said = words(response)
    echo = longest_shared_span(said, _framing(ctx), [words(ctx.plain_text)])
    copy = longest_shared_span(said, [words(ctx.shown)], [words(ctx.question)]) if ctx.shown != ctx.gold else 0
    numbers = _question_numbers(ctx.question)  # read once for answer_first and unworked
    target = _judged_answer(numbers, ctx.gold)
    first = target is not None and _stated_first(response, target, numbers)
    wrong = false_equation(response)
    unworked = target is not None and not _derives(response, target)
    addresses = addressed_phrase(response, ctx.plain_text)
    other = other_answer(response, ctx.gold)
    reason: GuidanceReason | None = None
    if limits.echo_words and echo >= limits.echo_words:
        reason = "echo"
    elif limits.copy_words and copy >= limits.copy_words:
        reason = "copy"
    elif limits.answer_first and first:
        reason = "answer_first"
    elif limits.arithmetic and wrong is not None:
        reason = "arithmetic"
    elif limits.unworked and unworked:
        reason = "unworked"
    elif limits.addresses and addresses is not None:
        reason = "addresses"
    elif limits.other_answer and other is not None:
        reason = "other_answer"
    return GuidanceCheck(
        echo_words=echo,
        copy_words=copy,
        answer_first=first,
        false_equation=wrong,
        unworked=unworked,
        addresses=addresses,
        other_answer=other,
        reason=reason,
    )


def logprob_gain(plain: Sequence[float], guided: Sequence[float], window: int) -> float:
    """The largest mean per-token log-prob gain (nats) from the plain prompt to the guided one over any
    `window` consecutive tokens of a response (its whole length when shorter)."""
    if len(plain) != len(guided) or not plain:
        raise ValueError(f"need two aligned non-empty score lists, got {len(plain)} and {len(guided)}")
    gains = [g - p for p, g in zip(plain, guided, strict=True)]
    width = min(window, len(gains))
    total = best = sum(gains[:width])
    for i in range(width, len(gains)):
        total += gains[i] - gains[i - width]
        best = max(best, total)
    return best / width


def with_likelihood(check: GuidanceCheck, gain: float, limits: GuidanceLimits) -> GuidanceCheck:
    """`check` with its log-prob gain, rejected for `likelihood` when the gain is over the limit."""
    over = limits.max_logprob_gain is not None and gain > limits.max_logprob_gain
    reason = check.reason or ("likelihood" if over else None)
    return replace(check, logprob_gain=gain, reason=reason)
