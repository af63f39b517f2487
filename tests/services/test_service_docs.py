"""The curl examples of docs/service.md, run as written against a live `mindgap serve --backend fake`."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.service import REPO, ServeProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow]

MARKER = "<!-- test: service -->"


def service_blocks(page: str) -> list[str]:
    """The ```bash blocks of the service page that follow the test marker."""
    blocks = re.findall(re.escape(MARKER) + r"\s*```bash\n(.*?)```", page, re.S)
    return [str(b) for b in blocks]


def test_service_docs_curl_examples_run_against_a_live_server(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    if shutil.which("curl") is None or shutil.which("jq") is None:
        pytest.skip("curl and jq are needed to run the docs examples")
    blocks = service_blocks((REPO / "docs" / "service.md").read_text())
    assert len(blocks) >= 2, "docs/service.md lost its tested examples"
    server = serve_process(MINDGAP_API_KEYS="docs-key")
    server.start()
    (tmp_path / "examples").symlink_to(REPO / "examples")
    script = "set -euo pipefail\n" + "\n".join(blocks)
    env = {"PATH": "/usr/bin:/bin", "MINDGAP_URL": server.url, "MINDGAP_API_KEY": "docs-key"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    out = done.stdout
    assert '"state": "completed"' in out
    assert (tmp_path / "rewritten.jsonl").read_text().count("\n") == 16  # each sample problem once (keep=1)
    assert '"chunks": 1' in out and '"policy_version": 0' in out
    assert '["body","params","k"]' in out
    assert "mindgap_problems_total{" in out
