"""Error answers of the API: 422s that name the field, client text echoed only in short, documented responses."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

SHOWN_CHARS = 64  # longest piece of client input repeated in an error message

DESCRIPTIONS = {
    401: "missing or invalid bearer key (`Authorization: Bearer <key>`); the body is not read",
    403: "the key lacks the admin scope, or a server-side path lies outside the allowed root",
    404: "no such job",
    409: "the job already finished",
    413: "body over `max_upload_bytes`, more rows than `max_sync_rows`, or a `path` file over `limits.path_bytes`",
    415: "a content type the endpoint does not take",
    422: "invalid input: `detail` names the field, the row (line number) or the limit",
    503: "Redis is unavailable; retry later",
}


class ErrorDetail(BaseModel):
    """The body of every error answer."""

    detail: str | list[dict[str, Any]] = Field(
        description="a message, or validation errors whose `loc` names the field, e.g. ['body', 'params', 'k']"
    )


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting the error `codes` an endpoint answers."""
    return {code: {"model": ErrorDetail, "description": DESCRIPTIONS[code]} for code in codes}


def shown(text: str) -> str:
    """`text` quoted for an error message, cut to `SHOWN_CHARS` so a huge input is not sent back whole."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return f"{text[:SHOWN_CHARS]!r}… ({len(text)} characters)"


Loc = tuple[str | int, ...]


def invalid(loc: Loc, message: str) -> RequestValidationError:
    """A 422 that names the field (`loc`) like FastAPI's own validation errors."""
    return invalid_fields([(loc, message)])


def invalid_fields(errors: list[tuple[Loc, str]]) -> RequestValidationError:
    """One 422 naming several fields, each with its message."""
    return RequestValidationError(
        [{"type": "value_error", "loc": loc, "msg": msg, "input": None} for loc, msg in errors]
    )


def validation_error(exc: ValidationError, prefix: tuple[str, ...]) -> RequestValidationError:
    """A pydantic error as a 422 whose locations start with `prefix`."""
    return RequestValidationError(
        [
            {"type": e["type"], "loc": (*prefix, *e["loc"]), "msg": e["msg"], "input": None}
            for e in exc.errors(include_url=False, include_context=False)
        ]
    )
