"""The import rules between packages (import-linter contracts in pyproject.toml), held by CI.

shared imports no project package; services and trainer import only shared; mindgap may import all,
and nothing imports mindgap. Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "services", "trainer", "mindgap")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed (the dev extra)")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_tree_keeps_the_import_rules() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("shared/grading.py", "from services.engine import Engine  # noqa"),
        ("trainer/losses.py", "    from mindgap.cli import app  # noqa"),  # a lazy import, inside a function
        ("services/pipeline.py", "import trainer.losses  # noqa"),
    ],
)
def test_an_upward_import_breaks_the_rules(tmp_path: Path, module: str, line: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    if line.startswith(" "):
        target.write_text(target.read_text() + f"\n\ndef _upward() -> None:\n{line}\n")
    else:
        target.write_text(target.read_text() + f"\n{line}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
