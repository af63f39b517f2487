"""How one dataset row becomes a problem: the layouts public math SFT and evaluation sets come in.

Pure functions over plain rows (dicts); `shared.dataio` reads the files and calls `map_row` per row.

A canonical field (question, solution, answer, id) comes from the source the user mapped — a field
name, a dotted path into nested objects (`meta.final`, `messages.0.content`), or a template such as
`{Body} {Question}` — or, unmapped, from the first of the common names present (matched
case-insensitively). Chat layouts are read by structure: a list of `{"role", "content"}` messages
(`messages`, or TRL's conversational `prompt`/`completion`) gives the user turn as the question, the
assistant turn after it as the solution, and any system turn apart. Whatever cannot be read as asked is
a `RowReject` naming the field and what it held — a value is never turned into something else (a
chat list into a JSON string, an object into text).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]

# Common source names per canonical field, tried in order when the user did not map the field (matched
# case-insensitively). `id` is never guessed: the row number is the id, so a sloppy id column cannot collide.
AUTO_FIELDS: dict[str, tuple[str, ...]] = {
    "question": ("question", "problem", "prompt", "query", "instruction", "input"),
    "solution": ("solution", "generated_solution", "response", "completion", "output", "rationale"),
    "answer": ("answer", "final_answer", "expected_answer", "gold_answer", "gold", "target", "ground_truth"),
}
# Whole conversations, read when no question field is present (chat SFT sets, ShareGPT).
CHAT_FIELDS = ("messages", "conversations", "conversation")
# Question text some layouts split over two fields: SVAMP/ASDiv put the story in `Body` before the
# `Question`; Alpaca puts the material in `input` after the `instruction`.
QUESTION_PARTS: dict[str, tuple[str | None, str | None, str]] = {
    "question": ("body", None, " "),
    "instruction": (None, "input", "\n\n"),
}

_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}
_ROLE_KEYS = ("role", "from")  # OpenAI/TRL, ShareGPT
_CONTENT_KEYS = ("content", "value", "text")

MISSING: Any = object()


class RowReject(Exception):
    """A row that cannot be read as asked: `kind` groups like failures, `message` says what was seen."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# ----------------------------------------------------------------------------------- field sources


@dataclass(frozen=True)
class Source:
    """A mapped source: one (dotted) path, or a template of literal text and `{path}` placeholders."""

    spec: str
    template: bool = False
    parts: tuple[tuple[str, str | None], ...] = ()  # a template's (literal text, placeholder path or None)

    @property
    def paths(self) -> list[str]:
        """The field paths the source reads."""
        return [path for _, path in self.parts if path is not None] if self.template else [self.spec]


def compile_source(spec: str) -> Source:
    """A field spec as a Source; ValueError for a malformed template (`{`, `{}`, `{a!r}`)."""
    if "{" not in spec and "}" not in spec:
        return Source(spec)
    parts: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(spec))
    except ValueError as e:
        raise ValueError(f"bad template {spec!r}: {e} (write a field as {{name}}, a brace as {{{{ or }}}})") from None
    for literal, name, format_spec, conversion in parsed:
        if name is not None and (not name.strip() or format_spec or conversion):
            raise ValueError(f"bad template {spec!r}: placeholders are field names such as {{Body}} or {{meta.q}}")
        parts.append((literal, None if name is None else name.strip()))
    if not any(name for _, name in parts):
        raise ValueError(f"bad template {spec!r}: it names no field (write a field as {{name}})")
    return Source(spec, template=True, parts=tuple(parts))


def _key(obj: dict[str, Any], name: str) -> str | None:
    """The key of `obj` called `name`, exactly or else case-insensitively."""
    if name in obj:
        return name
    folded = name.casefold()
    return next((k for k in obj if isinstance(k, str) and k.casefold() == folded), None)


def lookup(row: Row, path: str) -> Any:
    """The value at `path` (a key, or a dotted path through objects and list indices), or MISSING."""
    key = _key(row, path)
    if key is not None:
        return row[key]
    value: Any = row
    for segment in path.split("."):
        if isinstance(value, dict):
            k = _key(value, segment)
            if k is None:
                return MISSING
            value = value[k]
        elif isinstance(value, list) and re.fullmatch(r"-?\d+", segment) and -len(value) <= int(segment) < len(value):
            value = value[int(segment)]
        else:
            return MISSING
    return value


def top_level_name(path: str) -> str:
    """The row key a path starts at (the whole path when no row key has a dot in it)."""
    return path.split(".", 1)[0]


# ------------------------------------------------------------------------------------- values to text


def _number_text(value: float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def _fields_of(obj: dict[str, Any]) -> str:
    names = [str(k) for k in obj]
    return ", ".join(names[:8]) + (", …" if len(names) > 8 else "")


def to_text(value: Any, name: str, canonical: str) -> str | None:
    """Field `name`'s value as text: a scalar, or a list of scalars (numbers lose a spurious `.0`).

    Objects, chat messages and lists of objects are refused: turned into text they would be garbage.
    """
    if value is None or value is MISSING:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        return _number_text(value)
    if isinstance(value, dict):
        first = next(iter(value), "field")
        raise RowReject(
            "object value",
            f"{name!r} is an object ({_fields_of(value)}), not text: map a field inside it, "
            f"e.g. {canonical}={name}.{first}",
        )
    if isinstance(value, list | tuple):
        if is_chat(value):
            raise RowReject("chat value", f"{name!r} is a list of chat messages, not a plain {canonical}")
        if not all(v is None or isinstance(v, str | int | float | bool) for v in value):
            raise RowReject("object value", f"{name!r} is a list of objects, not text: map a field inside it")
        parts = [p for p in (to_text(v, name, canonical) for v in value) if p is not None]
        if canonical == "answer":
            # Written as a list so extract_gold treats it like OlympiadBench's list-as-text answers.
            return repr(parts) if len(parts) > 1 else (parts[0] if parts else None)
        return "\n\n".join(parts)
    raise RowReject("object value", f"{name!r} holds a {type(value).__name__}, not text")


# ---------------------------------------------------------------------------------------------- chat


def is_chat(value: Any) -> bool:
    """Whether `value` looks like a list of chat messages (objects with a role)."""
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(m, dict) for m in value)
        and any(_key(m, k) is not None for m in value for k in _ROLE_KEYS)
    )


def _message_text(content: Any, where: str) -> str:
    """A message's content: text, or OpenAI-style parts whose text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type", "text") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "\n\n".join(t for t in texts if isinstance(t, str))
    raise RowReject("malformed chat", f"{where} has content that is not text ({type(content).__name__})")


def _messages(value: Sequence[Any], where: str) -> list[tuple[str, str]]:
    """(role, text) of each message, roles normalised to system/user/assistant."""
    out: list[tuple[str, str]] = []
    for i, message in enumerate(value, 1):
        role_key = next((k for name in _ROLE_KEYS if (k := _key(message, name)) is not None), None)
        content_key = next((k for name in _CONTENT_KEYS if (k := _key(message, name)) is not None), None)
        if role_key is None or content_key is None:
            raise RowReject(
                "malformed chat", f"{where} message {i} has no role and content (fields: {_fields_of(message)})"
            )
        role = _ROLES.get(str(message[role_key]).lower())
        if role is None:
            raise RowReject(
                "malformed chat",
                f"{where} message {i} has role {message[role_key]!r}: only system, user and assistant turns are read",
            )
        out.append((role, _message_text(message[content_key], f"{where} message {i}")))
    return out


@dataclass(frozen=True)
class Turn:
    """One exchange of a conversation: the system text before it, the user turn, the assistant reply."""

    system: str | None
    user: str
    reply: str | None


def pick_turn(value: Sequence[Any], where: str, turn: int | None) -> Turn:
    """The exchange a conversation holds (`turn`: which user turn, 1-based, negative from the end).

    Without `turn` a conversation must hold one exchange: several user turns, or an assistant turn
    before the user's, is multi-turn data, refused rather than cut at a guessed place.
    """
    messages = _messages(value, where)
    roles = ", ".join(role for role, _ in messages)
    users = [i for i, (role, _) in enumerate(messages) if role == "user"]
    if not users:
        raise RowReject("no user turn", f"{where} is a list of chat messages with no user turn ({roles})")
    if turn is None:
        if len(users) > 1 or any(role == "assistant" for role, _ in messages[: users[0]]):
            raise RowReject(
                "multi-turn conversation",
                f"{where} is a conversation of {len(users)} user turns ({roles}): multi-turn data is not read "
                "as one problem; pick a turn with turn=N (1 = the first user turn, -1 = the last)",
            )
        chosen = users[0]
    else:
        index = turn - 1 if turn > 0 else len(users) + turn
        if not 0 <= index < len(users):
            raise RowReject("no such turn", f"turn {turn} asked for, but {where} has {len(users)} user turns")
        chosen = users[index]
    end = next((i for i in users if i > chosen), len(messages))
    replies = [text for role, text in messages[chosen + 1 : end] if role == "assistant"]
    if len(replies) > 1:
        raise RowReject(
            "multi-turn conversation", f"{where}: {len(replies)} assistant turns answer one user turn ({roles})"
        )
    system = "\n\n".join(text for role, text in messages[:chosen] if role == "system" and text.strip())
    return Turn(system=system or None, user=messages[chosen][1], reply=replies[0] if replies else None)


def reply_text(value: Sequence[Any], where: str) -> str:
    """The assistant text of a conversational completion (TRL): exactly one assistant message."""
    messages = _messages(value, where)
    replies = [text for role, text in messages if role == "assistant"]
    if len(replies) != 1 or any(role == "user" for role, _ in messages):
        roles = ", ".join(role for role, _ in messages)
        raise RowReject("malformed chat", f"{where} should hold one assistant message, holds: {roles}")
    return replies[0]


# ------------------------------------------------------------------------------------------ mapping


@dataclass
class Mapped:
    """One row's canonical values (text or None), the system turn, and where each value came from."""

    values: dict[str, str | None] = field(default_factory=dict)
    system: str | None = None
    sources: dict[str, str] = field(default_factory=dict)


def _render(row: Row, source: Source, canonical: str) -> str:
    """A template filled from the row; a missing placeholder field is a RowReject naming it."""
    out: list[str] = []
    for literal, path in source.parts:
        out.append(literal)
        if path is None:
            continue
        value = lookup(row, path)
        if value is MISSING or value is None:
            what = "no field" if value is MISSING else "an empty field"
            raise RowReject(
                "missing template field",
                f"template {canonical}={source.spec!r}: {what} {path!r} in this row (fields: {_fields_of(row)})",
            )
        out.append(to_text(value, path, canonical) or "")
    return "".join(out)


def _auto(row: Row, canonical: str) -> tuple[str, Any] | None:
    """The first common name for `canonical` that the row holds a value for, with the value."""
    for name in AUTO_FIELDS[canonical]:
        key = _key(row, name)
        if key is not None and row[key] is not None:
            return key, row[key]
    return None


def _joined_question(row: Row, key: str, value: Any) -> tuple[str, str | None]:
    """The question text with the part a layout keeps in a second field (SVAMP's Body), and its source."""
    text = to_text(value, key, "question")
    parts = QUESTION_PARTS.get(key.casefold())
    if parts is None or text is None:
        return repr(key), text
    before, after, sep = parts
    pieces: list[tuple[str, str]] = []
    for name in (before, key, after):
        other = None if name is None else _key(row, name)
        extra = None if other is None else text if other == key else to_text(row[other], other, "question")
        if other is not None and extra is not None and extra.strip():
            pieces.append((other, extra.strip()))
    return " + ".join(repr(k) for k, _ in pieces), sep.join(t for _, t in pieces)


def map_row(row: Row, sources: dict[str, Source | None], turn: int | None) -> Mapped:
    """The canonical values of one row; a RowReject when a mapped or found field cannot be read as text."""
    out = Mapped()
    conversation: Turn | None = None
    conversation_field = ""

    def mapped(canonical: str) -> tuple[str, Any] | None:
        source = sources.get(canonical)
        if source is None:
            return None
        return source.spec, _render(row, source, canonical) if source.template else lookup(row, source.spec)

    # question: the mapped source, else a common name, else a whole conversation
    found = mapped("question") or _auto(row, "question")
    whole_conversation = False
    if found is None:
        chat_key = next((k for name in CHAT_FIELDS if (k := _key(row, name)) is not None), None)
        if chat_key is not None:
            value = row[chat_key]
            if not (isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
                raise RowReject("malformed chat", f"{chat_key!r} is not a list of chat messages")
            found, whole_conversation = (chat_key, value), True
    if found is not None:
        name, value = found
        if whole_conversation or is_chat(value):  # a conversation, or TRL's conversational prompt
            conversation, conversation_field = pick_turn(value, repr(name), turn), name
            out.values["question"], out.sources["question"] = conversation.user, f"{name!r} user turn"
            if conversation.system is not None:
                out.system, out.sources["system"] = conversation.system, f"{name!r} system turn"
        elif sources.get("question") is None:
            out.sources["question"], out.values["question"] = _joined_question(row, name, value)
        else:
            out.values["question"], out.sources["question"] = to_text(value, name, "question"), repr(name)

    # solution: the mapped source, else the conversation's reply, else a common name
    found = mapped("solution")
    if found is None and conversation is not None and conversation.reply is not None:
        out.values["solution"] = conversation.reply
        out.sources["solution"] = f"{conversation_field!r} assistant turn"
    elif (found := found or _auto(row, "solution")) is not None:
        name, value = found
        chat = is_chat(value)  # TRL's conversational completion
        out.values["solution"] = reply_text(value, repr(name)) if chat else to_text(value, name, "solution")
        out.sources["solution"] = f"{name!r} assistant turn" if chat else repr(name)

    for canonical in ("answer", "id"):
        found = mapped(canonical) or (_auto(row, canonical) if canonical in AUTO_FIELDS else None)
        if found is not None:
            out.values[canonical], out.sources[canonical] = to_text(found[1], found[0], canonical), repr(found[0])

    for canonical, text in out.values.items():
        out.values[canonical] = text.strip() if text is not None and text.strip() else None
    return out


# --------------------------------------------------------------------------------------- gold answers

_PLAIN_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_CURRENCY = re.compile(r"^(?:\\\$|\$|€|£|¥)\s*(?=[-+]?\.?\d)")
# A unit after a number: words (`cm`, `miles per hour`, `sq. ft`, `m^2`), or anything in parentheses
# without a number of its own (`(apples)`); never a lone letter or a word that is part of the math.
_UNIT_WORD = r"(?:[A-Za-z]{2,}|[mgslh])\.?(?:\^?[23²³])?"
_UNIT = rf"\((?:[^()\d]|(?<=[A-Za-z^])[23])+\)|{_UNIT_WORD}(?:\s*/\s*{_UNIT_WORD}|\s+{_UNIT_WORD})*"
_NUMBER_WITH_UNIT = re.compile(rf"({_PLAIN_NUMBER})\s*(%?)\s*(?:{_UNIT})?")
_MATH_WORDS = {"pi", "sqrt", "and", "or", "to", "times", "mod", "plus", "minus", "over", "by", "of"}


def normalize_gold(answer: str) -> str:
    """A gold answer as a response states it: `145.0` → `145`, `1,000` → `1000`, and a plain number's
    currency sign or unit dropped (`9 (apples)` → `9`, `$5` → `5`, `12 cm` → `12`); anything else as is."""
    text = answer.strip()
    s = _CURRENCY.sub("", text)
    m = _NUMBER_WITH_UNIT.fullmatch(s)
    if m is None or any(w.lower() in _MATH_WORDS for w in re.findall(r"[A-Za-z]+", s[m.end(2) :])):
        return text
    return re.sub(r"^([-+]?\d+)\.0+$", r"\1", m.group(1).replace(",", "")) + m.group(2)


# ------------------------------------------------------------------------------------ layout advice


def describe_value(value: Any) -> str:
    """A few words on what a field holds: text (length), number, chat messages (roles), object, list."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"text, {len(value)} chars"
    if isinstance(value, bool | int | float):
        return "number"
    if is_chat(value):
        roles = [str(next((m[k] for n in _ROLE_KEYS if (k := _key(m, n)) is not None), "?")) for m in value]
        return "chat: " + ", ".join(roles)
    if isinstance(value, dict):
        return f"object: {_fields_of(value)}"
    if isinstance(value, list | tuple):
        return f"list of {len(value)}"
    return type(value).__name__


def describe_row(row: Row) -> str:
    """The fields of a row and what each holds, for an error that says which layout was found."""
    items = [f"{k} ({describe_value(v)})" for k, v in list(row.items())[:12]]
    return ", ".join(items) + (", …" if len(row) > 12 else "")


def suggest_question(row: Row) -> str | None:
    """The field most likely to hold the question: the longest text field (chat lists first)."""
    chats = [k for k, v in row.items() if is_chat(v)]
    if chats:
        return str(chats[0])
    texts = sorted(((len(v), str(k)) for k, v in row.items() if isinstance(v, str) and v.strip()), reverse=True)
    return texts[0][1] if texts else None
