"""Seeded arithmetic word problems for the CPU-scale reproduction (issue 17), and a retention task.

SmolLM2-135M solves no GSM8K problem but a fair share of short arithmetic stories, so this is the task
on which all three rewrite stages occur and accuracy can move both ways. A problem is a chain of
`steps` operations on one quantity ("Ava has 7 marbles. She buys 5 more. ... How many marbles does Ava
have now?"); the difficulty knob is the operand range, the number of steps, the operations allowed and
the phrasing (one fixed template per operation, several, or several plus an irrelevant-number
distractor sentence).

Reference solutions are written in ONE fixed terse style, one equation per step and a GSM8K final line:

    7+5=12. 12×2=24.
    #### 24

which is far from how the instruct model writes (sentences, `\\boxed{}`): that distance is the policy
gap the paper's rewriting is meant to close.

The retention task — "Which number is the largest: 47, 52 or 38?" — is something the base model mostly
does right and the training never targets (no arithmetic, no story, a different question form): if
off-policy fine-tuning makes the model forget, it shows there. Three candidates keep chance at 1/3.

Everything is a pure function of its seed: the same arguments give the same rows. `split_sets` draws the
training set first and the held-out set after it, skipping every question already drawn, so no
held-out question appears in training (asserted).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

Phrasing = Literal["plain", "varied", "distractor"]
OPS = "+-×÷"

NAMES = (
    "Ava", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemi", "Leo",
    "Maya", "Nico", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wen", "Yusuf",
)  # fmt: skip
ITEMS = (
    "apples", "marbles", "stickers", "pencils", "cards", "shells", "coins", "books", "stamps", "beads",
    "cookies", "balloons", "buttons", "crayons", "rocks", "toy cars",
)  # fmt: skip

# Per operation: the plain template first (the only one under `plain` phrasing), then the variants.
# Fields: {name}, {item}, {a} (the operand).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "Then {name} gets {a} more {item}.",
        "Then {name} buys {a} more {item}.",
        "Later, a friend gives {name} another {a} {item}.",
        "After that, {name} finds {a} more {item}.",
    ),
    "-": (
        "Then {name} gives away {a} {item}.",
        "Then {name} loses {a} of the {item}.",
        "Later, {name} hands {a} {item} to a classmate.",
        "After that, {name} uses up {a} {item}.",
    ),
    "×": (
        "Then the number of {item} {name} has becomes {a} times as large.",
        "Then {name} ends up with {a} times as many {item} as before.",
        "Later, {name}'s pile of {item} grows to {a} times its size.",
    ),
    "÷": (
        "Then {name} splits the {item} into {a} equal groups and keeps one group.",
        "Then {name} divides the {item} equally among {a} boxes and keeps just one box.",
        "Later, {name} keeps only one of {a} equal parts of the {item} and gives the rest away.",
    ),
}  # fmt: skip
STARTS = ("{name} has {a} {item}.", "{name} starts with {a} {item}.", "At first, {name} owns {a} {item}.")
QUESTIONS = (
    "How many {item} does {name} have now?",
    "How many {item} does {name} have at the end?",
    "What is the number of {item} {name} has now?",
)
DISTRACTOR = "{other} has {d} {other_item}."

FACTORS = (2, 3, 4, 5)  # multipliers and divisors stay small whatever the operand range


@dataclass(frozen=True)
class Difficulty:
    """The knob: operand range, steps per problem, operations allowed, phrasing."""

    max_number: int = 20  # start values (from 3) and +/- operands (from 2) stay within max_number
    min_steps: int = 1
    max_steps: int = 1
    ops: str = "+-"  # a subset of "+-×÷"
    phrasing: Phrasing = "plain"

    def __post_init__(self) -> None:
        if self.max_number < 4:
            raise ValueError(f"max_number must be at least 4, got {self.max_number}")
        if not 1 <= self.min_steps <= self.max_steps <= 3:
            raise ValueError(f"need 1 <= min_steps <= max_steps <= 3, got {self.min_steps}..{self.max_steps}")
        if not self.ops or any(op not in OPS for op in self.ops) or not set(self.ops) & set("+×"):
            # without + or × a chain could have no feasible step (nothing to subtract from, no divisor)
            raise ValueError(f"ops must be a subset of {OPS!r} containing + or ×, got {self.ops!r}")
        if self.phrasing not in ("plain", "varied", "distractor"):
            raise ValueError(f"phrasing must be plain, varied or distractor, got {self.phrasing!r}")

    def label(self) -> str:
        """A short name for tables: `n20-s1-+-plain`."""
        steps = f"{self.min_steps}" if self.min_steps == self.max_steps else f"{self.min_steps}-{self.max_steps}"
        return f"n{self.max_number}-s{steps}-{self.ops}-{self.phrasing}"


# Named settings for calibration and the run (docs/results.md lists what the base model scored on each).
DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(max_number=20, min_steps=1, max_steps=1, ops="+-", phrasing="plain"),
    "medium": Difficulty(max_number=20, min_steps=1, max_steps=2, ops="+-×", phrasing="varied"),
    "hard": Difficulty(max_number=50, min_steps=2, max_steps=3, ops="+-×÷", phrasing="distractor"),
    "starter": Difficulty(max_number=10, min_steps=1, max_steps=1, ops="+", phrasing="plain"),
}


@dataclass(frozen=True)
class Step:
    """One operation of a chain: `before op operand = after`."""

    op: str
    operand: int
    before: int
    after: int


def _apply(op: str, x: int, a: int) -> int:
    return {"+": x + a, "-": x - a, "×": x * a, "÷": x // a}[op]


def _feasible(op: str, x: int, max_number: int) -> list[int]:
    """Operands `op` can take on the current value `x` (results stay positive whole numbers)."""
    if op == "+":
        return list(range(2, max_number + 1))
    if op == "-":
        return list(range(2, min(x - 1, max_number) + 1))  # 2..x-1: "gives away 1 apples" reads badly
    if op == "×":
        return list(FACTORS) if x <= max_number else []  # keeps answers within a few hundred
    return [k for k in FACTORS if x % k == 0 and x // k >= 1]


def chain(rng: random.Random, d: Difficulty) -> tuple[int, list[Step]]:
    """A start value and `min_steps..max_steps` feasible operations drawn from `d.ops`."""
    x = rng.randint(3, d.max_number)
    start, steps = x, []
    for _ in range(rng.randint(d.min_steps, d.max_steps)):
        options = [(op, _feasible(op, x, d.max_number)) for op in d.ops]
        op, operands = rng.choice([(op, a) for op, a in options if a])
        a = rng.choice(operands)
        after = _apply(op, x, a)
        steps.append(Step(op, a, x, after))
        x = after
    return start, steps


def terse_solution(steps: list[Step]) -> str:
    """The fixed reference style: `7+5=12. 12×2=24.` then `#### 24` on its own line."""
    body = " ".join(f"{s.before}{s.op}{s.operand}={s.after}." for s in steps)
    return f"{body}\n#### {steps[-1].after}"


def word_problem(rng: random.Random, d: Difficulty) -> dict[str, Any]:
    """One problem row: question, terse solution, gold answer, and the chain it encodes."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, steps = chain(rng, d)

    def pick(options: tuple[str, ...]) -> str:
        return options[0] if d.phrasing == "plain" else rng.choice(options)

    sentences = [pick(STARTS).format(name=name, item=item, a=start)]
    sentences += [pick(TEMPLATES[s.op]).format(name=name, item=item, a=s.operand) for s in steps]
    if d.phrasing == "distractor":
        other = rng.choice([n for n in NAMES if n != name])
        other_item = rng.choice([i for i in ITEMS if i != item])
        text = DISTRACTOR.format(other=other, d=rng.randint(2, d.max_number), other_item=other_item)
        sentences.insert(rng.randint(1, len(sentences)), text)
    sentences.append(pick(QUESTIONS).format(name=name, item=item))
    return {
        "question": " ".join(sentences),
        "solution": terse_solution(steps),
        "answer": str(steps[-1].after),
        "start": start,
        "steps": [asdict(s) for s in steps],
        "difficulty": d.label(),
    }


def retention_problem(rng: random.Random) -> dict[str, Any]:
    """'Which number is the largest: a, b or c?' with three distinct two-digit numbers."""
    a, b, c = rng.sample(range(10, 100), 3)
    return {
        "question": f"Which number is the largest: {a}, {b} or {c}?",
        "answer": str(max(a, b, c)),
        "task": "largest_of_three",
    }


def draw(
    make: Callable[[random.Random], dict[str, Any]], size: int, seed: int, exclude: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """`size` rows with distinct questions, none in `exclude`; ids `<seed>-<i>`. Raises if the space runs dry."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    seen = set(exclude)
    tries = 0
    while len(rows) < size:
        tries += 1
        if tries > 50 * size + 1000:
            raise ValueError(f"only {len(rows)} distinct questions of {size} after {tries} draws (seed {seed})")
        row = make(rng)
        if row["question"] in seen:
            continue
        seen.add(row["question"])
        rows.append({"id": f"s{seed}-{len(rows)}", **row})
    return rows


def problems(
    size: int, difficulty: Difficulty, seed: int, exclude: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """`size` distinct word problems of one difficulty."""
    return draw(lambda rng: word_problem(rng, difficulty), size, seed, exclude)


def retention(size: int, seed: int) -> list[dict[str, Any]]:
    """`size` distinct largest-of-three questions."""
    return draw(retention_problem, size, seed)


def split_sets(
    train_size: int, heldout_size: int, difficulty: Difficulty, train_seed: int, heldout_seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and held-out problems from different seeds; no held-out question appears in training."""
    if train_seed == heldout_seed:
        raise ValueError("the training and held-out seeds must differ")
    train = problems(train_size, difficulty, train_seed)
    train_questions = frozenset(r["question"] for r in train)
    heldout = problems(heldout_size, difficulty, heldout_seed, exclude=train_questions)
    assert not train_questions & {r["question"] for r in heldout}, "a held-out question is in the training set"
    return train, heldout
