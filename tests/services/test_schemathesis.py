"""Property-based API testing: schemathesis generates requests from the service's own OpenAPI document and
sends them to `mindgap serve --backend fake`; no request, however odd, may get a 5xx.

The suite's run is derandomized (the same requests every time, so CI never fails by chance); a long random
run is the `fuzz` test, skipped unless MINDGAP_FUZZ_EXAMPLES=N asks for N requests per operation. The
service runs under the fixtures' address-space cap (`SERVE_MEMORY_CAP`), so no request can exhaust the machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from mindgap.redis_server import RedisServer
from services.app import openapi_schema
from tests.support.service import ServeProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ADMIN_KEY = "schemathesis-admin-key"


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One fake-engine service for the module, with keys and an allowed root holding a small dataset."""
    root = tmp_path_factory.mktemp("schemathesis")
    (root / "data").mkdir()
    (root / "data" / "d.jsonl").write_text('{"question": "What is 1+2?", "answer": "3"}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINDGAP_")}
    env |= {
        "MINDGAP_REDIS_URL": redis_server.url,
        "MINDGAP_KEY_PREFIX": f"mgtest-schemathesis-{os.getpid()}",
        "MINDGAP_ADMIN_KEYS": ADMIN_KEY,
        "MINDGAP_API_KEYS": "schemathesis-user-key",
        "MINDGAP_MAX_SYNC_ROWS": "4",
        "MINDGAP_MAX_UPLOAD_BYTES": "65536",
        "PYTHONUNBUFFERED": "1",
    }
    proc = ServeProcess(env, ["--allowed-root", str(root / "data")], root / "serve.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


# The document the app publishes, built without starting anything (the running service serves the same).
schema = schemathesis.openapi.from_dict(openapi_schema())


FUZZ_EXAMPLES = int(os.environ.get("MINDGAP_FUZZ_EXAMPLES", "0"))


def _call(case: Any, served: ServeProcess) -> None:
    # The admin key passes every route's auth, so the generated data reaches the handlers themselves.
    case.call_and_validate(
        base_url=served.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, checks=[not_a_server_error], timeout=30
    )


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: Any, served: ServeProcess) -> None:
    _call(case, served)


@pytest.mark.fuzz
@pytest.mark.skipif(not FUZZ_EXAMPLES, reason="a long random run: set MINDGAP_FUZZ_EXAMPLES=N (e.g. 2000)")
@schema.parametrize()
@settings(max_examples=max(FUZZ_EXAMPLES, 1), deadline=None, suppress_health_check=list(HealthCheck))
def test_a_long_random_run_finds_no_server_error(case: Any, served: ServeProcess) -> None:
    _call(case, served)
