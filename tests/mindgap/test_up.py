"""`mindgap up` supervision with stand-in children: readiness, max-versions, Ctrl-C, child failure, cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import pytest
from typer.testing import CliRunner

from mindgap.cli import _register, app
from mindgap.redis_server import free_port
from mindgap.up import (
    ChildFailed,
    ChildSpec,
    LoopStatus,
    OrchestrateError,
    Supervisor,
    UpConfig,
    UpPlan,
    new_versions,
    redis_spec,
    run_up,
)
from shared.wire import PolicyStatus, ReloadRecord
from trainer.publish import gap_line

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "sample.jsonl"


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_stop_reaches_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    # a child that launches a worker of its own, like torchrun does
    code = (
        "import subprocess, sys, time, pathlib;"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        f"tmp = pathlib.Path({str(pidfile)!r} + '.tmp'); tmp.write_text(str(p.pid));"
        f"tmp.rename({str(pidfile)!r}); time.sleep(60)"
    )
    with Supervisor(tmp_path / "logs", grace_s=5) as sup:
        child = sup.start(ChildSpec("worker", _py(code)))
        _wait_for(pidfile)
        grandchild = int(pidfile.read_text())
        assert _alive(grandchild)
    assert child.proc.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while _alive(grandchild):
        assert time.monotonic() < deadline, "grandchild survived its group's SIGTERM"
        time.sleep(0.05)


def test_stop_escalates_to_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = (
        "import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    )
    sup = Supervisor(tmp_path / "logs", grace_s=0.5)
    sup.start(ChildSpec("stubborn", _py(code)))
    _wait_for(ready)
    t0 = time.monotonic()
    codes = sup.stop()
    assert codes == {"stubborn": -signal.SIGKILL}
    assert time.monotonic() - t0 < 5


def test_check_names_the_dead_child_and_keeps_its_log(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs")
    sup.start(ChildSpec("sleeper", _py("import time; time.sleep(60)")))
    sup.start(ChildSpec("crasher", _py("print('boom: out of memory'); raise SystemExit(3)")))
    sup.children[1].proc.wait(10)
    with pytest.raises(ChildFailed) as err:
        sup.check()
    assert err.value.child.name == "crasher"
    assert err.value.code == 3
    assert "crasher exited with status 3" in str(err.value)
    assert "boom: out of memory" in err.value.child.log_tail()
    sleeper = sup.children[0]
    sup.stop()
    assert sleeper.proc.returncode is not None


def test_missing_redis_server_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(OrchestrateError, match=r"redis-server not found on PATH.*MINDGAP_REDIS_URL"):
        redis_spec(tmp_path)


Outcome = Literal["loaded", "refused"]


def _reload(version: int, time: float, outcome: Outcome = "loaded", error: str | None = None) -> ReloadRecord:
    path = f"/ckpt/v{version}"
    return ReloadRecord(
        version=version, time=time, path=path, duration_s=0.1, outcome=outcome, error=error, source="event"
    )


def test_new_versions_counts_distinct_successful_loads_after_the_start() -> None:
    view = PolicyStatus(
        version=4,
        path="/ckpt/v4",
        reloading=False,
        history=[
            _reload(1, 1.0),
            _reload(2, 2.0, outcome="refused", error="no READY marker"),
            _reload(3, 3.0),
            _reload(3, 4.0),
            _reload(4, 5.0),
        ],
    )
    assert new_versions(view, start_version=1) == [3, 4]
    assert new_versions(view, start_version=4) == []


def test_status_line_shows_version_mix_loss_and_lag() -> None:
    line = LoopStatus(
        elapsed_s=75,
        served_version=2,
        published_version=3,
        stages={"self": 6, "guided": 2, "expert": 2},
        step=30,
        loss=0.5,
        lag=4,
    ).line()
    assert line == (
        "policy v2 (published v3) · 10 examples: self 60% guided 20% expert 20% · step 30 loss 0.5000 · lag 4 · 01:15"
    )
    assert "no examples yet" in LoopStatus(elapsed_s=0, served_version=0).line()


def test_status_line_shows_the_trainers_policy_gap() -> None:
    # as the trainer publishes them: text values in its progress hash, one stage without IS ratios
    progress = {
        "step": "7",
        "gap/self/nll": "0.4123",
        "gap/self/share_below_p": "0.0625",
        "gap/self/is_ratio_ess": "0.987",
        "gap/expert/nll": "1.318",
        "gap/expert/share_below_p": "0.25",
    }
    line = LoopStatus(elapsed_s=5, served_version=1, step=7, gap=gap_line(progress)).line()
    assert "step 7 · gap self nll 0.41 p<0.1 6% ess 0.99 · expert nll 1.32 p<0.1 25% · 00:05" in line
    assert gap_line({"step": "3"}) == ""


def _plan(tmp_path: Path, record: Path, *, trainer_args: tuple[str, ...] = (), **cfg: object) -> UpPlan:
    port = free_port()
    fake = [sys.executable, "-m", "tests.support.loop_fakes"]
    config = UpConfig(data=SAMPLE, run_dir=tmp_path / "run", poll_s=0.1, grace_s=5, **cfg)  # type: ignore[arg-type]
    return UpPlan(
        cfg=config,
        run_dir=tmp_path / "run",
        service=ChildSpec("service", [*fake, "service", "--port", str(port), "--record", str(record)]),
        trainer=ChildSpec("trainer", [*fake, "trainer", "--record", str(record), *trainer_args]),
        service_url=f"http://127.0.0.1:{port}",
        api_key="test-key",
    )


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder where the fake children note what happened to them; children run from the repo root."""
    monkeypatch.delenv("MINDGAP_REDIS_URL", raising=False)
    monkeypatch.chdir(REPO)
    (tmp_path / "run").mkdir()
    path = tmp_path / "record"
    path.mkdir()
    return path


def _pids(record: Path, name: str) -> list[int]:
    return [int(p.suffix[1:]) for p in record.glob(f"{name}.*")]


@pytest.mark.redis
async def test_up_starts_redis_and_stops_after_max_versions(tmp_path: Path, record: Path) -> None:
    plan = _plan(tmp_path, record, max_versions=2)
    statuses: list[LoopStatus] = []
    result = await run_up(plan, statuses.append)
    assert result.reason == "max-versions"
    versions = [r.version for r in result.reloads]
    assert len(versions) >= 2 and versions == sorted(set(versions)) and versions[0] >= 1
    # the job went in as an online upload of the data file, and was cancelled at the end
    submitted = (record / "submitted").read_bytes()
    assert b'"mode": "online"' in submitted and SAMPLE.read_bytes()[:40] in submitted
    assert (record / "cancelled").exists()
    # every child stopped: the fakes exit 0 on SIGTERM, redis-server too
    assert result.exit_codes == {"trainer": 0, "service": 0, "redis": 0}
    for pid in _pids(record, "service") + _pids(record, "trainer"):
        assert (record / f"{pid}.terminated").exists()
    assert statuses and statuses[-1].step is not None
    assert "policy v" in statuses[-1].line()
    assert (plan.run_dir / "redis" / "appendonlydir").is_dir()
    assert (plan.run_dir / "api_key").stat().st_mode & 0o077 == 0


@pytest.mark.redis
async def test_a_child_failure_stops_the_others(tmp_path: Path, record: Path, redis_url: str, key_prefix: str) -> None:
    plan = _plan(tmp_path, record, trainer_args=("--fail-after", "0.5"), redis_url=redis_url, key_prefix=key_prefix)
    with pytest.raises(ChildFailed) as err:
        await run_up(plan)
    assert err.value.child.name == "trainer" and err.value.code == 3
    assert "simulated crash" in err.value.child.log_tail()
    (service_pid,) = _pids(record, "service")
    assert (record / f"{service_pid}.terminated").exists()
    assert not _alive(service_pid)


@pytest.mark.redis
async def test_service_that_never_gets_ready_times_out(
    tmp_path: Path, record: Path, redis_url: str, key_prefix: str
) -> None:
    plan = _plan(tmp_path, record, redis_url=redis_url, key_prefix=key_prefix, ready_timeout_s=1.0)
    plan.service.argv += ["--ready-after", "60"]
    with pytest.raises(OrchestrateError, match=r"service http://127\.0\.0\.1:\d+/readyz not ready after 1s"):
        await run_up(plan)
    assert all(not _alive(pid) for pid in _pids(record, "service") + _pids(record, "trainer"))


@pytest.mark.redis
@pytest.mark.slow
def test_ctrl_c_stops_every_child_and_exits_cleanly(
    tmp_path: Path, record: Path, redis_url: str, key_prefix: str
) -> None:
    plan = _plan(tmp_path, record, redis_url=redis_url, key_prefix=key_prefix, trainer_args=("--no-publish",))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(
        json.dumps(
            {
                "cfg": plan.cfg.model_dump(mode="json", exclude_none=True),
                "run_dir": str(plan.run_dir),
                "service": vars(plan.service),
                "trainer": vars(plan.trainer),
                "service_url": plan.service_url,
                "api_key": plan.api_key,
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.loop_fakes", "drive", str(plan_file)], stdout=subprocess.PIPE, text=True
    )
    _wait_for(record / "submitted", timeout=30)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert json.loads(out.strip().splitlines()[-1]) == {"reason": "interrupted", "versions": []}
    assert (record / "cancelled").exists()
    for pid in _pids(record, "service") + _pids(record, "trainer"):
        assert (record / f"{pid}.terminated").exists()
        assert not _alive(pid)


def test_up_cli_rejects_a_missing_data_file(tmp_path: Path) -> None:
    _register()
    result = CliRunner().invoke(app, ["up", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
    assert "DATA: no such file" in result.output


def test_up_plan_wires_children_through_their_clis(tmp_path: Path) -> None:
    cfg = UpConfig(data=SAMPLE, run_dir=tmp_path / "run", model="/models/tiny", nproc=2, checkpoint_every=3)
    plan = UpPlan.from_config(cfg)
    serve, train = plan.service.argv, plan.trainer.argv
    assert serve[1:4] == ["-m", "mindgap", "serve"] and train[1:4] == ["-m", "mindgap", "train"]
    assert serve[serve.index("--model") + 1] == train[train.index("--model") + 1] == "/models/tiny"
    assert train[train.index("--nproc") + 1] == "2" and train[train.index("--checkpoint-every") + 1] == "3"
    assert train[train.index("--checkpoint-dir") + 1] == str(tmp_path / "run" / "checkpoints")
    assert plan.service_url.endswith(serve[serve.index("--port") + 1])
    assert len(plan.api_key) >= 24


def test_up_config_reads_toml_env_and_flags_in_that_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "up.toml"
    config.write_text('max_versions = 5\nbackend = "fake"\n[fields]\nquestion = "problem"\n[params]\nk = 1\n')
    monkeypatch.setenv("MINDGAP_REDIS_URL", "redis://example:6379/0")
    monkeypatch.setenv("MINDGAP_MAX_VERSIONS", "4")
    cfg = UpConfig.load(config, data=SAMPLE, nproc=2)
    assert (cfg.max_versions, cfg.backend, cfg.nproc) == (4, "fake", 2)
    assert cfg.fields == {"question": "problem"} and cfg.params == {"k": 1}
    assert cfg.redis_url == "redis://example:6379/0"
    with pytest.raises(ValueError, match="nproc"):
        UpConfig.load(config, data=SAMPLE, nproc=0)


def test_up_cli_names_a_bad_option_value_in_one_line() -> None:
    _register()
    result = CliRunner().invoke(app, ["up", str(SAMPLE), "--loss", "mse", "--max-versions", "0"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: invalid configuration: ")
    assert "loss: " in line and "max_versions: " in line


def test_up_passes_verbose_to_its_children(tmp_path: Path) -> None:
    quiet = UpPlan.from_config(UpConfig(data=SAMPLE, run_dir=tmp_path / "quiet"))
    assert "-v" not in quiet.service.argv and "-v" not in quiet.trainer.argv
    loud = UpPlan.from_config(UpConfig(data=SAMPLE, run_dir=tmp_path / "loud", verbose=True))
    assert loud.service.argv[-1] == loud.trainer.argv[-1] == "-v"
