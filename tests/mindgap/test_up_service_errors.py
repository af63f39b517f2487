"""`mindgap up` waits out a 503 from its service (Redis slow or restarting), while other error answers end it."""

from __future__ import annotations

import pytest

from mindgap.up import OrchestrateError, _call
from services.client import ServiceError


def answer(status: int) -> None:
    raise ServiceError(status, "detail")


async def test_a_503_stays_a_service_error_for_the_loop_to_wait_out() -> None:
    with pytest.raises(ServiceError) as err:
        await _call("reading the job status", answer, 503)
    assert err.value.status == 503


async def test_other_error_answers_end_the_loop_with_one_line() -> None:
    with pytest.raises(OrchestrateError, match="service answered 404 reading the job status: detail"):
        await _call("reading the job status", answer, 404)
