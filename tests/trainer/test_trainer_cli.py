"""`mindgap train` option handling: help, config errors as one line, the flags forwarded to torchrun ranks."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mindgap.cli import _register, app
from trainer.config import TrainerConfig

_register()
runner = CliRunner()


def test_every_config_field_is_an_option():
    import typer

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    options = {p.name for p in command.params} - {"config", "verbose"}
    # adam_betas is a pair: set it in the TOML config file.
    assert options == set(TrainerConfig.model_fields) - {"adam_betas"}
    assert runner.invoke(app, ["train", "--help"]).exit_code == 0


def test_bad_value_is_one_line_error(tmp_path: Path):
    result = runner.invoke(app, ["train", "--loss", "nope", "--source", "redis"])
    assert result.exit_code == 2
    assert "loss" in result.output and "Traceback" not in result.output
    cfg = tmp_path / "t.toml"
    cfg.write_text("lr = 0.1\nunknown_key = 1\n")
    result = runner.invoke(app, ["train", "--config", str(cfg)])
    assert result.exit_code == 2 and "unknown_key" in result.output


def test_forwarded_flags_reproduce_the_options(monkeypatch, tmp_path: Path):
    captured = {}

    class FakePopen:
        def __init__(self, argv, env):
            captured["argv"], captured["env"] = argv, env

        def wait(self):
            return 0

    monkeypatch.setattr("mindgap.cli.train.subprocess.Popen", FakePopen)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    result = runner.invoke(
        app, ["train", "--nproc", "2", "--loss", "is", "--is-geometric", "--no-resume", "--kl-coef", "0.1", "-v"]
    )
    assert result.exit_code == 0, result.output
    argv = captured["argv"]
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    tail = argv[argv.index("trainer") + 1 :]
    assert tail == ["--loss", "is", "--is-geometric", "--kl-coef", "0.1", "--no-resume", "--verbose"]
    assert "--nproc" not in tail  # the ranks must not relaunch themselves


def test_ranks_parse_the_forwarded_flags_into_the_same_config(monkeypatch, tmp_path: Path):
    """`python -m trainer` (torchrun's entry) parses TrainerConfig itself: what `mindgap train` forwards
    resolves on the rank to exactly the config the command resolved."""
    from trainer.__main__ import parse_args

    data = tmp_path / "d.jsonl"
    data.write_text("")
    captured = {}

    class FakePopen:
        def __init__(self, argv, env):
            captured["argv"] = argv

        def wait(self):
            return 0

    monkeypatch.setattr("mindgap.cli.train.subprocess.Popen", FakePopen)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    args = ["--source", str(data), "--loss", "is", "--is-level", "sequence", "--no-publish", "--no-resume"]
    args += ["--max-steps", "7", "--lr", "0.001", "--checkpoint-dir", str(tmp_path / "ck"), "--idle-exit-s", "2.5"]
    assert runner.invoke(app, ["train", "--nproc", "2", *args]).exit_code == 0
    argv = captured["argv"]
    rank_cfg, verbose = parse_args(argv[argv.index("trainer") + 1 :])
    expected = TrainerConfig.load(
        None,
        source=str(data),
        loss="is",
        is_level="sequence",
        publish=False,
        resume=False,
        max_steps=7,
        lr=0.001,
        checkpoint_dir=tmp_path / "ck",
        idle_exit_s=2.5,
        nproc=1,
    )
    assert rank_cfg.model_dump() == expected.model_dump() and not verbose


def test_rank_entry_errors_are_one_line(tmp_path: Path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--max-steps", "0", "--source", "redis"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid configuration: max_steps:"), result.stderr
