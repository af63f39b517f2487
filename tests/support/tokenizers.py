"""Chat tokenizer fixtures whose EOS is not the token that ends a turn, built locally (no hub).

Each is a byte-level BPE over the 256 byte symbols (no merges: every byte one token, so any text
round-trips) plus the special tokens and chat template of a model family:
- Qwen2.5 style: ChatML, turns end with `<|im_end|>`, EOS `<|endoftext|>`;
- Llama 3 style: `<|start_header_id|>role<|end_header_id|>` headers, turns end with `<|eot_id|>`, EOS
  `<|end_of_text|>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class ChatStyle:
    """A model family's chat markup: its special tokens, EOS, turn terminator and template."""

    name: str
    specials: tuple[str, ...]
    eos: str
    turn_end: str
    template: str
    bos: str | None = None


QWEN_STYLE = ChatStyle(
    name="qwen2.5",
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    eos="<|endoftext|>",
    turn_end="<|im_end|>",
    template=(
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
)

LLAMA3_STYLE = ChatStyle(
    name="llama3",
    specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    eos="<|end_of_text|>",
    turn_end="<|eot_id|>",
    bos="<|begin_of_text|>",
    template=(
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
)

CHAT_STYLES = (QWEN_STYLE, LLAMA3_STYLE)


def make_chat_tokenizer(dest: Path, style: ChatStyle) -> Path:
    """Save a byte-level tokenizer with `style`'s special tokens and chat template to `dest`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=style.eos, bos_token=style.bos, pad_token=style.eos
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in style.specials if t != style.eos]})
    tokenizer.chat_template = style.template
    tokenizer.save_pretrained(str(dest))
    return dest


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session", params=CHAT_STYLES, ids=[s.name for s in CHAT_STYLES])
def chat_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[ChatStyle, Any]:
    """(style, tokenizer) for each chat style whose EOS differs from its turn terminator."""
    style: ChatStyle = request.param
    return style, load_tokenizer(make_chat_tokenizer(tmp_path_factory.mktemp(f"tok_{style.name}"), style))
