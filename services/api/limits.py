"""Request bounds, checked before any work starts: stage parameters, epochs and samples per job (422 naming the
field and the limit), and the depth and size of every input row (the row is rejected with its line number)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from services.api.errors import invalid, invalid_fields
from services.settings import RequestLimits
from shared.config import StageParams
from shared.dataio import RowItem


def check_params(params: StageParams, limits: RequestLimits, prefix: tuple[str, ...]) -> None:
    """422 naming every stage parameter above its limit (`prefix` + `params` + the field)."""
    over = limits.param_violations(params)
    if over:
        raise invalid_fields([((*prefix, "params", name), message) for name, message in over.items()])


def check_epochs(epochs: int | None, limits: RequestLimits, prefix: tuple[str, ...]) -> None:
    """422 for an online job asking for more epochs than the limit."""
    if epochs is not None and epochs > limits.epochs:
        raise invalid((*prefix, "epochs"), f"epochs = {epochs} is over the service's limit of {limits.epochs}")


def samples_per_problem(params: StageParams, epochs: int | None) -> int:
    """Engine samples one problem may cost over the job (per epoch for an open-ended online job)."""
    return max(1, params.k + params.resolve_attempts) * (epochs or 1)


def max_problems(params: StageParams, epochs: int | None, limits: RequestLimits) -> int:
    """The most problems a job with these parameters may hold under `limits.samples_per_job`."""
    return limits.samples_per_job // samples_per_problem(params, epochs)


def check_job_size(problems: int, params: StageParams, epochs: int | None, limits: RequestLimits) -> None:
    """422 when the job's problems would cost more samples than `limits.samples_per_job`."""
    most = max_problems(params, epochs, limits)
    if problems <= most:
        return
    raise invalid(
        ("body",),
        f"more than {most} problems at {samples_per_problem(params, epochs)} samples each"
        f" (k + resolve_attempts, × epochs) is over the service's limit of {limits.samples_per_job} samples"
        " per job (limits.samples_per_job): submit fewer rows or epochs, or a smaller k or resolve_attempts",
    )


def row_violation(row: Any, limits: RequestLimits) -> str | None:
    """Why `row` is nested too deep or holds too much text, or None.

    Measured with an explicit stack, so a row nested any depth is measured without recursion.
    """
    chars = 0
    stack: list[tuple[Any, int]] = [(row, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list | tuple):
            if depth > limits.json_depth:
                return f"nested more than {limits.json_depth} levels deep (limits.json_depth)"
            if isinstance(value, dict):
                chars += sum(len(str(key)) for key in value)
                stack.extend((v, depth + 1) for v in value.values())
            else:
                stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str | bytes):
            chars += len(value)
        if chars > limits.row_chars:
            return f"more than {limits.row_chars} characters of text (limits.row_chars)"
    return None


def bounded_rows(rows: Iterable[RowItem], limits: RequestLimits) -> Iterator[RowItem]:
    """`rows` with every row over the depth or size limit turned into that row's error."""
    for line, row in rows:
        if not isinstance(row, Exception) and (why := row_violation(row, limits)) is not None:
            yield line, ValueError(f"row {why}")
        else:
            yield line, row
