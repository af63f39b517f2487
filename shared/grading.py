"""Answer grading: gold and predicted answer extraction, math-verify and Qwen2.5-Math equivalence, a process pool.

Extraction order for a model response (`extract_prediction`):
  1. the content of the last `\\boxed{…}` (or `\\fbox{…}` / `\\framebox{…}`), nested braces allowed;
  2. else the last "#### X", "the (final) answer is X" or "Answer: X" phrase;
  3. else the last number in the text (integers, decimals, `a/b`, thousands separators, sign).
Step 3 is the lenient, paper-compatible fallback evaluation uses. Keeping data is strict
(`strict=True`, `states_final_answer`): a response that never states its answer explicitly has none,
because its last number may be any intermediate ("Step 2: 4 more. Total unknown.").

Comparison rules both methods share: integers compare exactly and only non-integers get a relative
tolerance (1e-4, for rounded decimals); a comma-separated answer is a list (`1,1` is two answers) unless
it is one number written with thousands separators (`1,000`, `10,\\!080`), and lists compare as
multisets of the same size; unit text after a number (`9 \\text{ apples}`, `\\text{9 apples}`, `9 apples`)
is dropped.

Gold answers (`extract_gold`, `find_gold`) come from the answer field when it holds one — a plain answer,
a GSM8K solution ending in `#### 42`, a `\\boxed{}` or an OlympiadBench list such as `['$\\frac{1}{2}$']`;
an answer field of several lines is a worked solution and is read like one — else from the solution's last
`\\boxed{}`, its `#### X`, or an answer phrase on its last line ("The answer is: 72", "Answer: 5",
"Final answer: 5", MetaMathQA style).

math-verify's own timeouts use `signal.alarm`, which only works in a process's main thread, so the
`Grader` runs every comparison in the main thread of pool worker processes and guards each item with a
wall-clock deadline: an item past its deadline grades False and the pool is killed and recreated.
"""

from __future__ import annotations

import ast
import asyncio
import math
import multiprocessing
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import Literal, NamedTuple

GradeMethod = Literal["math_verify", "qwen"]

_BOX_COMMANDS = ("\\boxed", "\\fbox", "\\framebox")
_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_ANSWER_PHRASE = re.compile(
    r"(?:####|(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)|answer\s*=)\s*:?\s*(.+?)(?:\n|$|\.\s|\.$)",
    re.IGNORECASE,
)
_TRAILING_WORDS = re.compile(r"(?<=[\d})\]])\s+[A-Za-z][A-Za-z\s]*$")
_BOLD = re.compile(r"\\(?:textbf|mathbf|boldsymbol)\{([^{}]*)\}")
_SCI_NOTATION = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")


# ----------------------------------------------------------------------------------------- extraction


def _boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{…}` in order, matching nested braces; `\\boxed 5` is accepted too."""
    found: list[str] = []
    i = 0
    while True:
        starts = [(text.find(cmd, i), cmd) for cmd in _BOX_COMMANDS]
        starts = [(pos, cmd) for pos, cmd in starts if pos >= 0]
        if not starts:
            return found
        pos, cmd = min(starts)
        # \fbox is a prefix of nothing else, but \boxed must not match \boxedfoo: check the next char.
        j = pos + len(cmd)
        if j < len(text) and text[j] == "{":
            depth, k = 0, j
            while k < len(text):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            if depth == 0:
                found.append(text[j + 1 : k].strip())
                i = k + 1
                continue
            return found  # unbalanced: a truncated response has no usable box after this point
        if j < len(text) and text[j] == " ":
            m = re.match(r" +([^\s$]+)", text[j:])
            if m:
                found.append(m.group(1))
        i = j


def _strip_dollars(s: str) -> str:
    """Drop math delimiters (`$…$`, `\\(…\\)`, also mid-text as in "$69$,$84$") and a trailing period."""
    s = re.sub(r"(?<!\\)\$", "", s.strip().rstrip(".")).strip()
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    return s.rstrip(".").strip()


def _list_text(answer: str) -> list[str] | None:
    """An OlympiadBench-style list written as text ("['3', '4']"), or None when it is not one."""
    s = answer.strip()
    if not (s.startswith("[") and s.endswith("]") and ("'" in s or '"' in s)):
        return None
    # Written as a Python repr the backslashes are doubled; written by hand they are single ("\\frac"),
    # and must not become escape sequences such as a form feed.
    literal = s if "\\\\" in s else s.replace("\\", "\\\\")
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, list) and value and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    return None


def _join_answers(parts: Sequence[str]) -> str:
    return ", ".join(_strip_dollars(p) for p in parts if _strip_dollars(p))


def extract_gold(answer: str | None, solution: str | None) -> str | None:
    """The gold answer from an answer field (plain, `#### X`, boxed, list-as-text) or else from the solution."""
    found = find_gold(answer, solution)
    return None if found is None else found.text


class Gold(NamedTuple):
    """A gold answer, the field it was found in (`answer` or `solution`) and the convention that marked it."""

    text: str
    field: str
    convention: str  # "", "list", "\\boxed{}", "####" or "answer phrase"


def find_gold(answer: str | None, solution: str | None) -> Gold | None:
    """The gold answer with where it was found, or None; see `extract_gold`."""
    if answer is not None and answer.strip():
        items = _list_text(answer)
        if items is not None:
            joined = _join_answers(items)
            return Gold(joined, "answer", "list") if joined else None
        if "\n" in answer.strip() or "####" in answer:  # a worked solution in the answer field (GSM8K…)
            found = _gold_in_solution(answer)
            return None if found is None else Gold(found[0], "answer", found[1])
        boxes = _boxed_contents(answer)
        if boxes:
            return Gold(boxes[-1], "answer", "\\boxed{}") if boxes[-1] else None
        plain = _strip_dollars(answer)
        return Gold(plain, "answer", "") if plain else None
    found = _gold_in_solution(solution) if solution else None
    return None if found is None else Gold(found[0], "solution", found[1])


def _gold_in_solution(solution: str) -> tuple[str, str] | None:
    """The last `\\boxed{}`, else `#### X`, else an answer phrase on the last non-empty line."""
    boxes = _boxed_contents(solution)
    if boxes and boxes[-1]:
        return boxes[-1], "\\boxed{}"
    if "####" in solution:
        tail = solution.rsplit("####", 1)[1].strip()
        tail = tail.replace(",", "") if re.fullmatch(_NUMBER, tail) else tail
        return (tail, "####") if tail else None
    # Only the last line: "the answer is" earlier in a worked solution is often part of the reasoning.
    last = solution.strip().rsplit("\n", 1)[-1]
    phrases = [p for p in (_phrase_answer(m.group(1)) for m in _ANSWER_PHRASE.finditer(last)) if p]
    return (phrases[-1], "answer phrase") if phrases else None


def _phrase_answer(captured: str) -> str:
    """The answer part of an "answer is …" capture, unwrapping nested phrases and markdown emphasis."""
    text = captured.strip().strip("*").strip()
    inner = _ANSWER_PHRASE.search(text)  # "Final Answer: The final answer is $5$."
    if inner and inner.group(1).strip() != text:
        return _phrase_answer(inner.group(1))
    # Plain words after a number or formula are units or prose ("12 apples"): keep the math part.
    return _TRAILING_WORDS.sub("", _strip_dollars(text)).strip("*").strip()


def extract_prediction(response: str, strict: bool = False) -> str | None:
    """The model's final answer: last `\\boxed{}`, else an "answer is"/"####" phrase, else the last number.

    `strict` drops the last-number fallback: only an explicitly stated answer counts. Where strict
    extraction finds an answer it is the lenient one, so a strict check before lenient grading is exact.
    """
    boxes, phrases = _stated(response)
    if boxes:
        return boxes[-1]
    if phrases:
        return phrases[-1]
    if strict:
        return None
    numbers = re.findall(_NUMBER, response)
    return numbers[-1].replace(",", "") if numbers else None


def _stated(response: str) -> tuple[list[str], list[str]]:
    """The non-empty `\\boxed{}` contents of `response` and its answer phrases, each in order."""
    boxes = [b for b in _boxed_contents(response) if b]
    phrases = [p for p in (_phrase_answer(m.group(1)) for m in _ANSWER_PHRASE.finditer(response)) if p]
    return boxes, phrases


def stated_answers(response: str) -> list[str]:
    """Every answer `response` states explicitly: its `\\boxed{}` contents, then its answer phrases."""
    boxes, phrases = _stated(response)
    return boxes + phrases


def states_final_answer(response: str) -> bool:
    """Whether `response` states its final answer explicitly (`\\boxed{}` or an answer phrase)."""
    return extract_prediction(response, strict=True) is not None


# ---------------------------------------------------------------------------------------- math-verify


def _for_math_verify(answer: str) -> str:
    """Box an answer so math-verify's LaTeX extraction parses all of it; spell out `4.5e33` notation."""
    answer = _BOLD.sub(r"\1", answer)
    answer = _SCI_NOTATION.sub(lambda m: f"{m.group(1)}\\times 10^{{{int(m.group(2))}}}", answer)
    return "\\boxed{" + answer + "}"


def answers_match(pred: str, gold: str, timeout_seconds: int | None = 5) -> bool:
    """Whether `pred` equals `gold` under math-verify, in this process (use `Grader` for untrusted input)."""
    from math_verify import parse, verify

    if threading.current_thread() is not threading.main_thread():
        timeout_seconds = None  # signal.alarm only works in the main thread; the caller bounds the time

    if _normalize_text(pred) == _normalize_text(gold) and _normalize_text(gold):
        return True
    pred_parts, gold_parts = _answer_list(pred), _answer_list(gold)
    plus_minus = any(pm in pred + gold for pm in ("\\pm", "\\mp"))  # math-verify expands `1 \pm 2` to a set
    if (pred_parts is not None or gold_parts is not None) and not plus_minus:
        # math-verify reads `1,1` as the set {1}, which equals `1`: lists are compared here instead.
        if pred_parts is None or gold_parts is None or len(pred_parts) != len(gold_parts):
            return False
        return _multiset_equal(pred_parts, gold_parts, lambda p, g: answers_match(p, g, timeout_seconds))
    gold_parsed = parse(_for_math_verify(gold), parsing_timeout=timeout_seconds)
    pred_parsed = parse(_for_math_verify(pred), parsing_timeout=timeout_seconds)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_seconds))


_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _answer_list(answer: str) -> list[str] | None:
    """The answers of an unbracketed comma-separated list (`1, 3, 5`), or None for a single answer.

    One number with thousands separators (`1,000`, `\\$32,\\!348`) is a single answer.
    """
    parts = _split_top_level(answer)
    if len(parts) < 2:
        return None
    compact = re.sub(r"\\[!,;]|\\?\$|\s", "", answer)
    return None if _THOUSANDS.fullmatch(compact) else parts


def _multiset_equal(preds: Sequence[str], golds: Sequence[str], equal: Callable[[str, str], bool]) -> bool:
    """Whether every prediction matches a distinct gold (same count, any order: `1, 3` is `3, 1`)."""
    remaining = list(golds)
    for p in preds:
        hit = next((g for g in remaining if equal(p, g)), None)
        if hit is None:
            return False
        remaining.remove(hit)
    return not remaining


# ---------------------------------------------------------------------------- Qwen2.5-Math equivalence

_UNIT_WORDS = (
    "degrees?|cm|centimeters?|meters?|km|kilometers?|inch(?:es)?|feet|foot|ft|units?|sq|square|mph|"
    "hours?|minutes?|seconds?|days?|years?|dollars?|cents?|pounds?|miles?|kg|grams?|liters?|ml|"
    "points?|people|students?|percent"
)


_TEXT_GROUP = r"\\(?:text|mbox|mathrm)\{[^{}]*\}"
_PLAIN_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:/\d+)?|[-+]?\\[dt]?frac\{-?\d+(?:\.\d+)?\}\{\d+(?:\.\d+)?\}"
# A number followed by unit text: `9 \text{ apples}`, `9 apples` (two letters at least, so `5 i` stays).
_NUMBER_THEN_TEXT = re.compile(rf"({_PLAIN_NUMBER})\s*(?:{_TEXT_GROUP}|[A-Za-z]{{2,}}(?:\s+[A-Za-z]+)*)")
_TEXT_WRAPPED = re.compile(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}")


def _drop_unit_text(s: str) -> str:
    """The number alone when `s` is a number with unit text after it, or such a thing inside `\\text{}`."""
    wrapped = _TEXT_WRAPPED.fullmatch(s)
    inner = wrapped.group(1).strip() if wrapped else s
    m = _NUMBER_THEN_TEXT.fullmatch(inner)
    return m.group(1) if m else s


def _fix_fracs(s: str) -> str:
    """`\\frac12` → `\\frac{1}{2}`, `\\frac1{2}` → `\\frac{1}{2}` (single-character arguments get braces)."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if not part or part[0] == "{":
            out += part
            continue
        if len(part) < 2:
            return s
        a, rest = part[0], part[1:]
        if rest[0] == "{":
            out += "{" + a + "}" + rest
        else:
            out += "{" + a + "}{" + rest[0] + "}" + rest[1:]
    return out


def _fix_frac_denominator(s: str) -> str:
    """`\\frac{270}7` → `\\frac{270}{7}`."""
    return re.sub(r"(\\frac\{[^{}]*\})(\w)", r"\1{\2}", s)


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def strip_string(s: str) -> str:
    """Qwen2.5-Math's answer normalisation: drop layout, units, degrees, %, thousands separators, `$`."""
    s = str(s).strip().replace("\n", "").rstrip(".")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", " ")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s).replace("\\end{array}", "\\end{pmatrix}")
    s = s.replace("bmatrix", "pmatrix").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\{", "{").replace("\\}", "}")
    s = _drop_unit_text(s.strip())
    # Trailing unit words, with or without \text{}/\mbox{}/\mathrm{}.
    s = re.sub(
        r"\\(?:text|mbox|mathrm)\{[\s~]*(?:" + _UNIT_WORDS + r"|m|g|s|mm|nm|K|J|W|N|Hz|eV)\s*\}(\^\{?-?\d\}?)?\s*$",
        "",
        s,
    )
    s = re.sub(r"(?<=[\d}])\s*(?:" + _UNIT_WORDS + r")(\^\{?\d\}?)?\s*$", "", s)
    s = re.sub(r"\\(?:text|mbox|mathrm|textbf|mathbf|boldsymbol)\{(.*?)\}", r"\1", s)
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("\\dots", "").replace("\\cdots", "").replace("\\ldots", "")
    s = re.sub(r"(\d),(?=\d{3}(?!\d))", r"\1", s)  # 10,080 → 10080 (three-digit groups only)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" or "k=1" → the right-hand side when the left side is a short name.
    m = re.fullmatch(r"\s*[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(.+)", s)
    if m:
        s = m.group(1)
    s = _fix_sqrt(_fix_frac_denominator(_fix_fracs(s.replace(" ", ""))))
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = re.sub(r"(\d)\.0+$", r"\1", s)
    return s


def _normalize_text(s: str) -> str:
    return strip_string(s).lower()


def _to_number(s: str) -> float | None:
    """A float for a plain number, a percentage or a constant LaTeX expression; None otherwise."""
    # Thousands separators are gone after strip_string: a comma here separates answers.
    if re.fullmatch(r"-?\d+", s):
        return int(s)  # exact, however large (a float would make 2**60 equal 2**60 + 1)
    try:
        return float(s)
    except ValueError:
        pass
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}", s)
    if m and float(m.group(3)) != 0:
        return (-1 if m.group(1) else 1) * float(m.group(2)) / float(m.group(3))
    try:
        from latex2sympy2_extended import latex2sympy

        expr = latex2sympy(s)
        if getattr(expr, "free_symbols", {1}):
            return None
        value = complex(expr.evalf())
        return value.real if abs(value.imag) < 1e-12 else None
    except Exception:
        return None


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside (), [] or {}."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def _numbers_equal(pred: float, gold: float) -> bool:
    """Integers exactly (123456 is not 123457); a relative 1e-4 only between two non-integers."""
    if isinstance(pred, int) and isinstance(gold, int):
        return pred == gold
    if float(pred).is_integer() or float(gold).is_integer():
        return math.isclose(pred, gold, rel_tol=1e-12, abs_tol=1e-12)  # float noise only (0.2 * 100)
    return math.isclose(pred, gold, rel_tol=1e-4, abs_tol=1e-9)


def _qwen_equal(pred: str, gold: str, depth: int, percent: bool) -> bool:
    if pred == gold:
        return True
    gold_num, pred_num = _to_number(gold), _to_number(pred)
    if gold_num is not None and pred_num is not None:
        # A percentage may be written as 20 or 0.2. Qwen accepts both scalings always; only doing so when
        # a % was written avoids passing 2 for 200.
        scales = (1, 0.01, 100) if percent else (1,)  # int 1 and 100 keep an integer gold an int
        return any(_numbers_equal(pred_num, gold_num * k) for k in scales)
    if depth > 3:
        return False
    brackets = re.fullmatch(r"([(\[])(.*)([)\]])", pred), re.fullmatch(r"([(\[])(.*)([)\]])", gold)
    if brackets[0] and brackets[1]:
        (po, pin, pc), (go, gin, gc) = brackets[0].groups(), brackets[1].groups()
        p_parts, g_parts = _split_top_level(pin), _split_top_level(gin)
        # Intervals and tuples compare elementwise; the bracket kinds must agree ((3,4] is not (3,4)).
        if len(p_parts) == len(g_parts) > 1 and (po, pc) == (go, gc):
            return all(_qwen_equal(p, g, depth + 1, percent) for p, g in zip(p_parts, g_parts, strict=True))
        if len(p_parts) == len(g_parts) > 1:
            return False
    p_parts, g_parts = _split_top_level(pred), _split_top_level(gold)
    if len(g_parts) > 1 and len(p_parts) == len(g_parts):
        # Unbracketed lists of answers ("1, 3, 5"): equal as multisets.
        return _multiset_equal(p_parts, g_parts, lambda p, g: _qwen_equal(p, g, depth + 1, percent))
    return _symbolic_equal(pred, gold)


def _symbolic_equal(pred: str, gold: str) -> bool:
    try:
        import sympy
        from latex2sympy2_extended import latex2sympy

        a, b = latex2sympy(pred), latex2sympy(gold)
        if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr):
            return bool(sympy.simplify(a - b) == 0)
        return bool(a == b)
    except Exception:
        return False


def qwen_math_equal(pred: str, gold: str) -> bool:
    """Qwen2.5-Math-style equivalence: `strip_string` both, then string, numeric, elementwise, symbolic.

    The symbolic step runs sympy without a time limit: grade untrusted text through `Grader(method="qwen")`.
    """
    p, g = strip_string(pred), strip_string(gold)
    if not p or not g:
        return False
    percent = any("%" in x or "percent" in x for x in (pred, gold))
    return p.lower() == g.lower() or _qwen_equal(p, g, 0, percent)


# ------------------------------------------------------------------------------------------- the pool


def grade_response(response: str, gold: str, method: GradeMethod = "math_verify", timeout_seconds: int = 5) -> bool:
    """Extract the response's final answer and compare it with `gold` (runs inside a pool worker)."""
    pred = extract_prediction(response)
    if pred is None or not gold.strip():
        return False
    if method == "qwen":
        return qwen_math_equal(pred, gold)
    return answers_match(pred, gold, timeout_seconds)


GradeFn = Callable[[str, str, GradeMethod, int], bool]

WORKER_START_TIMEOUT = 120.0


def _worker_ready() -> bool:
    return True


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: exit when the grading process is gone.

    Workers are children of the forkserver, not of the grader's process, and hold the forkserver's
    liveness pipe open; without this a SIGKILLed service would leave its workers and forkserver behind.
    """

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, name="grader-parent-watch", daemon=True).start()


def _mp_context() -> multiprocessing.context.BaseContext:
    # forkserver: safe with threads in the parent (vLLM, asyncio) and fast to re-create after a kill,
    # since new workers fork from a server that has already imported sympy and math-verify.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["math_verify", "shared.grading"])
    return ctx


class Grader:
    """Grades (response, gold) pairs in worker processes, each item under a wall-clock timeout.

    At most `workers` items are in flight, so an item's clock starts when a worker takes it. An item
    past its deadline grades False; the pool is then killed and recreated, and the other in-flight items
    are resubmitted. A crashed worker breaks the pool: its in-flight items are retried one at a time,
    and an item that breaks the pool twice grades False. Concurrent `grade_batch` calls take turns, one
    batch owning the pool at a time, so a restart never kills another batch's items.
    """

    def __init__(self, workers: int = 1, timeout: float = 5.0, grade_fn: GradeFn = grade_response) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.workers = workers
        self.timeout = timeout
        self._grade_fn = grade_fn
        self._inner_timeout = max(1, int(timeout))  # math-verify's alarm takes whole seconds
        self._pool: ProcessPoolExecutor | None = None
        # One lock per event loop: an asyncio.Lock binds to the first loop that waits on it, and a grader
        # may outlive a loop (one `asyncio.run` per batch, a test fixture shared by many tests).
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
        self.timeouts = 0  # items graded False for running past the deadline (for logs and tests)
        self.restarts = 0

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Grader:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def _ensure_pool(self) -> ProcessPoolExecutor:
        """The pool, started and warm: worker start-up (seconds on a busy machine) never eats an item's time."""
        if self._pool is None:
            pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=_mp_context(),
                initializer=_exit_with_parent,
                initargs=(os.getpid(),),
            )
            self._pool = pool
            warmups = [asyncio.wrap_future(pool.submit(_worker_ready)) for _ in range(self.workers)]
            try:
                await asyncio.wait_for(asyncio.gather(*warmups), WORKER_START_TIMEOUT)
            except (TimeoutError, BrokenProcessPool) as e:
                self._stop_pool(grace=0)
                raise RuntimeError(f"grader workers did not start within {WORKER_START_TIMEOUT:.0f}s") from e
        return self._pool

    def _stop_pool(self, grace: float) -> None:
        """Stop the workers, killing any still running after `grace` seconds (a hung one never exits)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        if grace <= 0:
            for p in processes:
                p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def _restart_pool(self) -> None:
        self._stop_pool(grace=0)
        self.restarts += 1

    def close(self) -> None:
        """Shut the worker processes down (idle workers exit; busy ones are killed after a short grace)."""
        self._stop_pool(grace=2.0)

    async def grade_batch(self, items: Sequence[tuple[str, str]], method: GradeMethod = "math_verify") -> list[bool]:
        """Grade (response_text, gold_answer) pairs; True means the response's final answer equals gold."""
        async with self._lock():  # one batch at a time owns the pool, so a restart never hits another batch
            try:
                return await self._grade(items, method)
            except BaseException:
                # Cancelled or failed mid-batch: workers may still be busy (or hung) on abandoned items.
                self._restart_pool()
                raise

    def _lock(self) -> asyncio.Lock:
        """The running loop's batch lock."""
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    async def _grade(self, items: Sequence[tuple[str, str]], method: GradeMethod) -> list[bool]:
        results = [False] * len(items)
        queue: deque[int] = deque(range(len(items)))
        strikes = [0] * len(items)
        inflight: dict[asyncio.Future[bool], tuple[int, float]] = {}
        while queue or inflight:
            while queue and len(inflight) < self.workers:
                suspect = strikes[queue[0]] > 0
                if inflight and (suspect or any(strikes[i] for i, _ in inflight.values())):
                    break  # items that once broke the pool run alone
                pool = await self._ensure_pool()
                i = queue.popleft()
                response, gold = items[i]
                cfut: Future[bool] = pool.submit(self._grade_fn, response, gold, method, self._inner_timeout)
                inflight[asyncio.wrap_future(cfut)] = (i, time.monotonic() + self.timeout)
            wait_for = max(0.0, min(deadline for _, deadline in inflight.values()) - time.monotonic())
            done, _ = await asyncio.wait(inflight, timeout=wait_for, return_when=asyncio.FIRST_COMPLETED)
            broken: list[int] = []
            for fut in done:
                i, _ = inflight.pop(fut)
                try:
                    results[i] = bool(fut.result())
                except BrokenProcessPool:
                    broken.append(i)
                except Exception:
                    results[i] = False  # a judge that raises cannot vouch for the answer
            now = time.monotonic()
            expired = [f for f, (_, deadline) in inflight.items() if deadline <= now]
            if broken or expired:
                for fut in expired:
                    i, _ = inflight.pop(fut)
                    results[i] = False
                    self.timeouts += 1
                # Everything else that was in flight dies with the pool: resubmit it.
                for fut, (i, _) in inflight.items():
                    fut.cancel()
                    queue.appendleft(i)
                inflight.clear()
                for i in broken:
                    strikes[i] += 1
                    if strikes[i] >= 2:
                        results[i] = False
                    else:
                        queue.appendleft(i)
                self._restart_pool()
        return results
