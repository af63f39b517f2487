"""Prompts: the plain solve prompt, guided prompts for the three guidance modes, expert text, rendering.

`render_prompt_ids` is the one place a chat prompt becomes token ids: the engine samples and scores on
it and the trainer trains on it, so both see exactly the same tokens. It neutralises special-token text
inside message contents first, so dataset text can never close the user turn or open a system turn.

`turn_end_ids` reads the token that closes an assistant turn from the chat template. The engine stops
sampling on it and `completion_token_ids` closes expert responses with it, so every record of one model
ends the same way even where the tokenizer's EOS is another token (Qwen2.5: EOS `<|endoftext|>`, turns
end with `<|im_end|>`; Llama 3: `<|end_of_text|>` and `<|eot_id|>`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from shared.config import ExpertFormat, GuidanceMode
from shared.schema import ChatMessage

SOLVE_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

GUIDED_INSTRUCTION = (
    "Now write your own complete solution to the problem, reasoning step by step as if you were solving it "
    "for the first time. Do not mention or refer to the {what}, and do not copy its wording. "
    "Put your final answer within \\boxed{{}}."
)

# Inserted after the first character of special-token text found in data: the text stays readable and
# byte-for-byte recoverable, but no longer matches the tokenizer's added-token patterns.
ZERO_WIDTH_JOINER = "\u200d"


def solve_messages(question: str) -> list[ChatMessage]:
    """The plain prompt `prompt(q)`: the question and the step-by-step/boxed instruction."""
    return [ChatMessage(role="user", content=f"{question.strip()}\n\n{SOLVE_INSTRUCTION}")]


def hint_prefix(solution: str, fraction: float) -> str:
    """The first `fraction` of the solution, cut back to a line or sentence end (else a word end)."""
    solution = solution.strip()
    target = max(1, int(len(solution) * fraction))
    head = solution[:target]
    boundaries = [m.end() for m in re.finditer(r"\n|[.!?](?=\s)", head)]
    if boundaries and boundaries[-1] > 0:
        return head[: boundaries[-1]].strip()
    # No sentence end before the cut: take the first one after it, unless that is the whole solution.
    later = re.search(r"\n|[.!?](?=\s)", solution[target:])
    if later and target + later.end() < len(solution):
        return solution[: target + later.end()].strip()
    space = head.rfind(" ")
    return (head[:space] if space > 0 else head).strip()


def guided_messages(
    question: str,
    solution: str | None,
    answer: str | None,
    mode: GuidanceMode,
    hint_fraction: float,
) -> list[ChatMessage]:
    """The guided prompt `guide(q, s*, a*, mode)`; `solution`/`hint` fall back to `answer` without a solution."""
    solution = (solution or "").strip()
    answer = (answer or "").strip()
    if mode in ("solution", "hint") and not solution:
        mode = "answer"
    if mode == "solution":
        guidance = f"Reference solution (for your eyes only):\n{solution}"
        what = "reference solution"
    elif mode == "hint":
        guidance = f"Hint (the beginning of a reference solution):\n{hint_prefix(solution, hint_fraction)}"
        what = "hint"
    elif answer:
        guidance = f"The correct final answer is: {answer}"
        what = "given answer"
    else:
        raise ValueError("guided prompt needs a reference solution or a gold answer")
    content = f"Problem:\n{question.strip()}\n\n{guidance}\n\n" + GUIDED_INSTRUCTION.format(what=what)
    return [ChatMessage(role="user", content=content)]


_CALCULATOR_NOTE = re.compile(r"<<[^<>\n]*>>")  # GSM8K: "48/2 = <<48/2=24>>24"
_FINAL_HASHES = re.compile(r"^[ \t]*####[ \t]*(\S(?:.*\S)?)[ \t]*\Z", re.MULTILINE)  # a last line "#### X"


def expert_text(solution: str | None, answer: str | None, gold: str | None, fmt: ExpertFormat) -> str | None:
    """The expert demonstration: the solution, else the answer text; None when the row has neither.

    `raw` keeps it as written. `boxed` writes it in the solve prompt's convention: GSM8K calculator notes
    are removed and a final `#### X` becomes `\\boxed{X}`; an answer-only row becomes `\\boxed{gold}`. A
    solution that states its answer some other way is left as written.
    """
    text = solution or answer
    if not text:
        return None
    if fmt == "raw":
        return text
    text = _CALCULATOR_NOTE.sub("", text)
    final = _FINAL_HASHES.search(text)
    if final:
        return text[: final.start()] + f"\\boxed{{{final.group(1)}}}"
    if not solution and gold is not None and "\\boxed" not in text:
        return f"\\boxed{{{gold}}}"
    return text


def special_token_strings(tokenizer: Any) -> list[str]:
    """The text forms of the tokenizer's special and added markup tokens, longest first."""
    found: set[str] = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token in decoder.values():
        text = str(getattr(token, "content", token))
        # Non-special added tokens can be ordinary words; only markup-looking ones can fake a turn.
        if getattr(token, "special", False) or re.fullmatch(r"<.+>|\[.+\]", text):
            found.add(text)
    return sorted((t for t in found if len(t) >= 2), key=len, reverse=True)


def neutralize_special_tokens(text: str, specials: Sequence[str]) -> str:
    """Break every occurrence of a special-token string in `text` with a zero-width joiner."""
    if not specials or not text:
        return text
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    return pattern.sub(lambda m: m.group(0)[0] + ZERO_WIDTH_JOINER + m.group(0)[1:], text)


def render_prompt_ids(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template with the generation prompt appended."""
    specials = special_token_strings(tokenizer)
    safe = [
        {"role": m.role, "content": neutralize_special_tokens(m.content, specials)}
        for m in (ChatMessage.model_validate(m) for m in messages)
    ]
    out = tokenizer.apply_chat_template(safe, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding (a Mapping) by default; older versions a plain list.
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    ids = out.tolist() if hasattr(out, "tolist") else list(out)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise ValueError(f"chat template returned {len(ids)} sequences for one conversation")
        ids = ids[0]
    return [int(i) for i in ids]


# Assistant text for reading the template's turn ending: plain words every template keeps verbatim.
_TURN_PROBE = "mindgap turn probe"


def turn_end_ids(tokenizer: Any) -> list[int]:
    """The token that closes an assistant turn in the tokenizer's chat template, as a one-token list.

    The template renders a user turn and an assistant turn of known text; the first special token written
    after that text closes the turn (ChatML `<|im_end|>`, Llama 3 `<|eot_id|>`; whitespace written before
    the next turn is not part of the response). A template that writes no special token there, or does not
    keep the text, falls back to the EOS token.
    """
    messages = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": _TURN_PROBE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    at = text.rfind(_TURN_PROBE) if isinstance(text, str) else -1
    if at >= 0:
        tail = text[at + len(_TURN_PROBE) :]
        found = [(tail.find(t), -len(t), t) for t in special_token_strings(tokenizer) if t in tail]
        if found:
            token = min(found)[2]
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                return [token_id]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-turn token in its chat template and no EOS token")
    return [int(tokenizer.eos_token_id)]


def completion_token_ids(tokenizer: Any, text: str, turn_end: Sequence[int]) -> list[int]:
    """Token ids of an assistant response written by someone else (expert), closed by `turn_end`."""
    # split_special_tokens: a literal "<|im_end|>" in the data stays text, as in the prompt.
    ids: list[int] = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [*ids, *turn_end]
