"""A grading judge for process-pool tests: hangs beyond any alarm on HANG, kills its worker on CRASH."""

from __future__ import annotations

import os
import time

from shared.grading import GradeMethod, grade_response


def flaky_judge(response: str, gold: str, method: GradeMethod, timeout_seconds: int) -> bool:
    """`grade_response`, except for the responses HANG and CRASH (picklable: a module-level function)."""
    if response == "HANG":
        while True:  # a busy loop in C would ignore signal.alarm too; sleep stands in for it
            time.sleep(60)
    if response == "CRASH":
        os._exit(3)
    return grade_response(response, gold, method, timeout_seconds)
