"""One Grader shared by concurrent grade_batch calls, as the pipeline's per-problem coroutines share it."""

from __future__ import annotations

import asyncio
import time

from shared.grading import Grader
from tests.support.grading import flaky_judge


async def _concurrently(g: Grader) -> list[list[bool]]:
    return await asyncio.gather(
        g.grade_batch([("\\boxed{2}", "2"), ("\\boxed{3}", "2")]),
        g.grade_batch([("\\boxed{4}", "4")]),
        g.grade_batch([("\\boxed{5}", "6"), ("\\boxed{6}", "6")]),
    )


def test_concurrent_calls_from_successive_event_loops() -> None:
    # A grader outlives event loops (a module-scoped fixture, one asyncio.run per offline batch); calls
    # that wait on each other must work in every loop, not only the first one they waited in.
    expected = [[True, False], [True], [False, True]]
    with Grader(workers=1, timeout=10.0) as g:
        assert asyncio.run(_concurrently(g)) == expected
        assert asyncio.run(_concurrently(g)) == expected


async def test_a_hung_item_does_not_spoil_a_concurrent_batch() -> None:
    # The hung item's batch kills and restarts the pool; the other batch waits its turn instead of
    # losing its in-flight items with the killed workers.
    with Grader(workers=2, timeout=2.0, grade_fn=flaky_judge) as g:
        start = time.monotonic()
        hung, other = await asyncio.gather(
            g.grade_batch([("HANG", "1"), ("\\boxed{1}", "1")]),
            g.grade_batch([("\\boxed{7}", "7"), ("\\boxed{8}", "9"), ("\\boxed{9}", "9")]),
        )
        assert hung == [False, True] and other == [True, False, True]
        assert g.timeouts == 1 and time.monotonic() - start < 15
