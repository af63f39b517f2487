"""Turn endings read from the chat template, for tokenizers whose EOS is not the end-of-turn token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.prompts import completion_token_ids, render_prompt_ids, solve_messages, turn_end_ids
from tests.support.tokenizers import QWEN_STYLE, ChatStyle, load_tokenizer, make_chat_tokenizer


def test_turn_end_is_the_templates_terminator_not_eos(chat_tokenizer: tuple[ChatStyle, Any]) -> None:
    style, tokenizer = chat_tokenizer
    (end,) = turn_end_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(end) == style.turn_end
    assert end != tokenizer.eos_token_id


def test_a_template_that_writes_no_terminator_falls_back_to_eos(tmp_path: Path) -> None:
    plain = ChatStyle(
        name="plain",
        specials=QWEN_STYLE.specials,
        eos="<|endoftext|>",
        turn_end="<|endoftext|>",
        template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}",
    )
    tokenizer = load_tokenizer(make_chat_tokenizer(tmp_path, plain))
    assert turn_end_ids(tokenizer) == [tokenizer.eos_token_id]


def test_expert_completion_ends_with_the_turn_terminator(chat_tokenizer: tuple[ChatStyle, Any]) -> None:
    style, tokenizer = chat_tokenizer
    end = turn_end_ids(tokenizer)
    ids = completion_token_ids(tokenizer, f"2 + 3 = 5, not {style.turn_end} or {style.eos}. \\boxed{{5}}", end)
    assert ids[-1:] == end
    # Special-token text in the data stays text: the only terminator is the appended one.
    assert end[0] not in ids[:-1] and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids[:-1]) == f"2 + 3 = 5, not {style.turn_end} or {style.eos}. \\boxed{{5}}"


def test_prompt_plus_completion_is_the_templates_own_conversation(chat_tokenizer: tuple[ChatStyle, Any]) -> None:
    """Training on prompt + completion ids trains exactly the assistant turn the template would write."""
    _, tokenizer = chat_tokenizer
    messages = solve_messages("What is 2 plus 3?")
    answer = "2 + 3 = 5, so \\boxed{5}."
    ids = render_prompt_ids(tokenizer, messages) + completion_token_ids(tokenizer, answer, turn_end_ids(tokenizer))
    whole = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages] + [{"role": "assistant", "content": answer}],
        tokenize=False,
    )
    assert whole.startswith(tokenizer.decode(ids))
    assert whole[len(tokenizer.decode(ids)) :].strip() == ""  # only the whitespace between turns is left


@pytest.mark.smollm
def test_default_model_turn_end_is_its_eos(default_model_dir: Path) -> None:
    tokenizer = load_tokenizer(default_model_dir)
    assert turn_end_ids(tokenizer) == [tokenizer.eos_token_id] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
