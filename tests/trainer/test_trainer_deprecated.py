"""The trainer's old name for `key_prefix` (`prefix`, MINDGAP_PREFIX, --prefix) still works, with a warning."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mindgap.cli import _register, app
from trainer.config import TrainerConfig

_register()
runner = CliRunner()


@pytest.fixture(autouse=True)
def no_prefix_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINDGAP_PREFIX", raising=False)
    monkeypatch.delenv("MINDGAP_KEY_PREFIX", raising=False)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "deprecated" in r.getMessage()]


def test_the_new_name_needs_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert TrainerConfig.load(key_prefix="new").key_prefix == "new"
        assert TrainerConfig.load().key_prefix == "mindgap"
    assert _warnings(caplog) == []


def test_mindgap_prefix_env_still_sets_the_key_prefix_and_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MINDGAP_PREFIX", "old-env")
    with caplog.at_level(logging.WARNING):
        assert TrainerConfig.load().key_prefix == "old-env"
    assert _warnings(caplog) == [
        "MINDGAP_PREFIX is deprecated and will be removed in the next release: use MINDGAP_KEY_PREFIX"
    ]
    # the new variable wins where both are set, and a flag over both
    monkeypatch.setenv("MINDGAP_KEY_PREFIX", "new-env")
    assert TrainerConfig.load().key_prefix == "new-env"
    assert TrainerConfig.load(key_prefix="flag").key_prefix == "flag"


def test_prefix_in_a_toml_file_or_as_a_keyword_still_works_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "train.toml"
    config.write_text('prefix = "old-toml"\n')
    with caplog.at_level(logging.WARNING):
        assert TrainerConfig.load(config).key_prefix == "old-toml"
        assert TrainerConfig.load(prefix="old-kw").key_prefix == "old-kw"
    assert [m.split(" is deprecated")[0] for m in _warnings(caplog)] == [f"{config}: 'prefix'", "'prefix'"]
    # precedence as for any key: environment over the file
    monkeypatch.setenv("MINDGAP_PREFIX", "old-env")
    assert TrainerConfig.load(config).key_prefix == "old-env"


def test_train_prefix_flag_still_works_warns_and_reaches_the_ranks_as_key_prefix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from trainer.__main__ import parse_args

    captured: dict[str, Any] = {}

    class FakePopen:
        def __init__(self, argv: list[str], env: dict[str, str]) -> None:
            captured["argv"] = argv

        def wait(self) -> int:
            return 0

    monkeypatch.setattr("mindgap.cli.train.subprocess.Popen", FakePopen)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for given in (["--prefix", "old-flag"], ["--prefix=old-flag"]):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = runner.invoke(app, ["train", "--nproc", "2", "--source", "redis", *given])
        assert result.exit_code == 0, result.output
        assert _warnings(caplog) == ["--prefix is deprecated and will be removed in the next release: use --key-prefix"]
        tail = captured["argv"][captured["argv"].index("trainer") + 1 :]
        assert tail[tail.index("--key-prefix") + 1] == "old-flag" and "--prefix" not in tail
        assert parse_args(tail)[0].key_prefix == "old-flag"
    assert "--prefix " not in runner.invoke(app, ["train", "--help"]).output  # deprecated: not advertised
