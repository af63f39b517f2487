"""`mindgap rewrite` with the fake engine: outputs, summary, bad input, config precedence, atomic output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mindgap.cli import _register, app
from services.fake_engine import EOS_ID, FakeEngine
from services.offline import AtomicRecordWriter, RewriteConfig
from shared.dataio import read_examples
from shared.schema import Example, Stage

ROOT = Path(__file__).resolve().parents[2]

ROWS = [
    '{"question": "What is 1+1?", "answer": "2"}',  # line 1: solved on the plain prompt
    "{not json",  # line 2: malformed
    '{"question": "What is 1+2?", "solution": "1 + 2 = 3\\n#### 3"}',  # line 3: solved when guided
    '{"answer": "4"}',  # line 4: no question
    '{"question": "Describe a circle.", "solution": "A circle is round."}',  # line 5: ungradable
    '{"question": "What is 2+2?", "answer": "4"}',  # line 6: wrong, then right
]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(ROWS) + "\n")
    return path


def invoke(*args: str | Path):
    _register()
    # Typer runs a lone command without its name; with the other areas registered it is a group.
    name = ["rewrite"] if isinstance(typer.main.get_command(app), typer.core.TyperGroup) else []
    return CliRunner().invoke(app, [*name, *map(str, args), "--backend", "fake"])


def records(path: Path) -> list[Example]:
    return [Example.model_validate_json(line) for line in path.read_text().splitlines()]


def test_rewrite_writes_records_summary_and_table(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "rewritten.jsonl"
    result = invoke(data, "-o", out, "--k", "2", "--resolve-attempts", "2", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    # each bad row is reported with its line number
    assert f"{data}:2:" in result.output and f"{data}:4:" in result.output and "no question" in result.output
    assert "self" in result.output and "guided" in result.output and "expert" in result.output

    examples = records(out)
    by_problem = {e.problem_id: e for e in examples}
    assert by_problem["1"].stage is Stage.SELF and by_problem["6"].stage is Stage.SELF
    assert by_problem["3"].stage is Stage.GUIDED
    assert by_problem["5"].stage is Stage.EXPERT and by_problem["5"].grade == "ungradable"

    summary = json.loads(out.with_name("rewritten.jsonl.summary.json").read_text())
    assert summary["problems"] == 4 and summary["examples"] == len(examples) == 4
    assert summary["skipped_rows"] == 2 and summary["ungradable"] == 1
    assert summary["stages"]["self"]["problems"] == 2 and summary["stages"]["self"]["percent_problems"] == 50.0
    assert summary["generated_tokens"] > 0
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_ids_are_stable_across_runs(data: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert invoke(data, "-o", first).exit_code == 0
    assert invoke(data, "-o", second).exit_code == 0
    assert first.read_text() == second.read_text()


def test_limit_and_field_mapping(tmp_path: Path) -> None:
    src = tmp_path / "mapped.jsonl"
    src.write_text(
        "\n".join(json.dumps({"key": f"k{i}", "problem": f"What is {i}+1?", "final": str(i + 1)}) for i in range(5))
    )
    out = tmp_path / "out.jsonl"
    result = invoke(
        src, "-o", out, "--fields", "question=problem", "--fields", "answer=final", "--fields", "id=key", "--limit", "3"
    )
    assert result.exit_code == 0, result.output
    assert sorted({e.problem_id for e in records(out)}) == ["k0", "k1", "k2"]


def test_parquet_output_reads_back(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    assert invoke(data, "-o", out).exit_code == 0
    rows = list(read_examples(out))
    assert len(rows) == 4 and all(isinstance(ex, Example) for _, ex in rows)
    # the same records as the JSONL output, `meta` included, exactly
    as_jsonl = tmp_path / "out.jsonl"
    assert invoke(data, "-o", as_jsonl).exit_code == 0
    assert [ex.model_dump() for _, ex in rows] == [ex.model_dump() for _, ex in read_examples(as_jsonl)]


def test_strict_makes_a_bad_row_fatal(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = invoke(data, "-o", out, "--strict")
    assert result.exit_code == 2
    assert "line 2" in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fields", "question=nope"], "unknown field 'nope'"),
        (["--fields", "nonsense"], "bad field mapping"),
        (["--guidance", "telepathy"], "invalid configuration: stages.guidance"),
        (["--expert-format", "latex"], "invalid configuration: stages.expert_format"),
        (["--k", "-1"], "invalid configuration: stages.k"),
        (["--config", "missing.toml"], "config file not found"),
    ],
)
def test_bad_options_give_one_clear_line(data: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke(data, "-o", tmp_path / "out.jsonl", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_missing_input_file(tmp_path: Path) -> None:
    result = invoke(tmp_path / "absent.jsonl", "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2
    assert "input file not found" in result.output and "Traceback" not in result.output


def test_interrupted_run_leaves_no_output(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import services.offline

    out = tmp_path / "out.jsonl"
    out.write_text("previous complete output\n")
    real = services.offline.rewrite_batch
    calls = 0

    async def fail_on_second_batch(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return await real(*args, **kwargs)

    monkeypatch.setattr(services.offline, "rewrite_batch", fail_on_second_batch)
    result = invoke(data, "-o", out, "--batch-size", "1")
    assert result.exit_code != 0 and calls == 2
    assert out.read_text() == "previous complete output\n"  # the old file is untouched, not truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_atomic_writer_gives_the_umask_mode_and_cleans_up(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        with AtomicRecordWriter(tmp_path / "ok.jsonl") as writer:
            writer.write([])
        assert (tmp_path / "ok.jsonl").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        with pytest.raises(RuntimeError), AtomicRecordWriter(tmp_path / "failed.jsonl"):
            raise RuntimeError("interrupted")
    finally:
        os.umask(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.jsonl"]


def test_config_file_env_and_flags_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "rewrite.toml"
    toml.write_text('batch_size = 7\n[stages]\nk = 3\nkeep = 2\n[engine]\nmodel = "org/model"\n')
    monkeypatch.setenv("MINDGAP_SEED", "11")
    cfg = RewriteConfig.load(toml, input=Path("in.jsonl"), output=Path("o.jsonl"), stages={"keep": 5})
    assert cfg.batch_size == 7 and cfg.seed == 11
    assert cfg.stages.k == 3 and cfg.stages.keep == 5  # a flag overrides one key of a TOML table, not all
    assert cfg.engine.model == "org/model"
    assert cfg.summary_path == Path("o.jsonl.summary.json")


def test_console_script_in_a_subprocess(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mindgap", "rewrite", str(data), "-o", str(out), "--backend", "fake"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resolved config RewriteConfig" in proc.stderr and "warning" in proc.stderr
    assert "examples" in proc.stdout and len(records(out)) == 4


GSM8K_ROW = '{"question": "How many clips did Natalia sell?", "answer": "She sold 48/2 = <<48/2=24>>24.\\n#### 24"}'


@pytest.mark.parametrize(
    ("flags", "completion"),
    [
        ([], "She sold 48/2 = <<48/2=24>>24.\n#### 24"),
        (["--expert-format", "boxed"], "She sold 48/2 = 24.\n\\boxed{24}"),
    ],
)
def test_expert_format(tmp_path: Path, flags: list[str], completion: str) -> None:
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text(GSM8K_ROW + "\n")
    result = invoke(data, "-o", out, "--k", "0", "--resolve-attempts", "0", *flags)
    assert result.exit_code == 0, result.output
    (ex,) = records(out)
    assert ex.stage is Stage.EXPERT and ex.response == completion and ex.answer == "24"
    assert ex.completion_token_ids == FakeEngine().encode_completion(completion)
    assert ex.completion_token_ids[-1] == EOS_ID  # the fake's end of turn, as a sampled response's
