"""The ZeRO stage a run gets (1 and 2 on one rank run as stage 0) and the resume check on the checkpoint's layout."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from tests.support.trainer import ROOT, make_examples, read_metrics, run_train, train_argv, train_env, write_jsonl
from trainer.checkpoint import STATE_FILE, check_layout, read_state, ready_versions
from trainer.config import TrainerConfig
from trainer.zero import (
    cpu_flags,
    ds_config,
    effective_zero_stage,
    loop_clips,
    native_bf16,
    resolve_precision,
)


@pytest.mark.parametrize(
    ("stage", "world", "expected"),
    [(0, 1, 0), (1, 1, 0), (2, 1, 0), (3, 1, 3), (0, 2, 0), (1, 2, 1), (2, 2, 2), (3, 2, 3), (2, 8, 2)],
)
def test_effective_zero_stage(stage: int, world: int, expected: int) -> None:
    assert effective_zero_stage(stage, world) == expected


def test_ds_config_one_rank_runs_zero2_as_stage0_two_ranks_keep_it() -> None:
    cfg = TrainerConfig(zero_stage=2, batch_size=4, micro_batch_size=1, precision="bf16")
    one, two = ds_config(cfg, 1), ds_config(cfg, 2)
    assert one["zero_optimization"] == {"stage": 0}
    assert two["zero_optimization"] == {"stage": 2}
    # Only the stage differs: the same global batch, clipping and precision.
    assert (one["train_batch_size"], one["gradient_accumulation_steps"]) == (4, 4)
    assert (two["train_batch_size"], two["gradient_accumulation_steps"]) == (4, 2)
    for key in ("gradient_clipping", "bf16", "train_micro_batch_size_per_gpu"):
        assert one[key] == two[key], key


def test_fp32_stage0_clips_in_the_loop_and_everything_else_in_deepspeed() -> None:
    fp32 = TrainerConfig(zero_stage=2, precision="fp32", grad_clip=0.5)
    assert loop_clips(fp32, 1) and ds_config(fp32, 1)["gradient_clipping"] == 0.0  # stage 0: the loop clips
    assert not loop_clips(fp32, 2) and ds_config(fp32, 2)["gradient_clipping"] == 0.5  # ZeRO-2
    assert not loop_clips(fp32.model_copy(update={"zero_stage": 3}), 1)
    bf16 = TrainerConfig(zero_stage=0, precision="bf16", grad_clip=0.5)
    assert not loop_clips(bf16, 1) and ds_config(bf16, 1)["gradient_clipping"] == 0.5


def test_ds_config_zero3_stays_on_one_rank() -> None:
    cfg = TrainerConfig(zero_stage=3, precision="fp32")
    assert ds_config(cfg, 1)["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert ds_config(cfg, 1, inference=True)["zero_optimization"] == {"stage": 3}
    zero2 = TrainerConfig(zero_stage=2, precision="fp32")
    assert ds_config(zero2, 1, inference=True)["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize(
    ("requested", "native", "expected"),
    [("auto", True, "bf16"), ("auto", False, "fp32"), ("bf16", False, "bf16"), ("fp32", True, "fp32")],
)
def test_auto_precision_is_bf16_only_where_the_device_runs_it_natively(
    requested: str, native: bool, expected: str
) -> None:
    assert resolve_precision(requested, native) == expected  # type: ignore[arg-type]


def test_auto_is_the_default_and_must_be_resolved_before_deepspeed_sees_it() -> None:
    cfg = TrainerConfig()
    assert cfg.precision == "auto"
    with pytest.raises(ValueError, match="resolved"):
        ds_config(cfg, 1)


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu sse avx2 avx512f\n", False),
        ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n", True),  # Cooper Lake, Zen 4
        ("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n", True),  # Sapphire Rapids
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm with the BF16 extension
        ("processor\t: 0\nFeatures\t: fp asimd\n", False),
    ],
)
def test_cpu_bf16_is_read_off_the_kernel_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpuinfo: str, native: bool
) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    monkeypatch.setattr("trainer.zero.cpu_flags", lambda: cpu_flags(path))
    assert native_bf16(torch.device("cpu")) is native
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_check_layout_names_both_layouts_and_the_way_out(tmp_path: Path) -> None:
    state = {"step": 4, "world_size": 1, "zero_stage": 0}
    where = tmp_path / "v1"
    check_layout(tmp_path, 1, state, world=1, zero_stage=0, precision="fp32")
    with pytest.raises(ValueError) as err:
        check_layout(tmp_path, 1, state, world=2, zero_stage=2, precision="fp32")
    msg = str(err.value)
    assert f"cannot resume from {where}" in msg
    assert "world size 1 at ZeRO stage 0 (--nproc 1 --zero-stage 0, 1 or 2)" in msg
    assert "world size 2 at ZeRO stage 2 (--nproc 2 --zero-stage 2)" in msg
    assert f"--model {where}" in msg
    with pytest.raises(ValueError, match=r"world size 1 at ZeRO stage 3 \(--nproc 1 --zero-stage 3\)"):
        check_layout(tmp_path, 1, state, world=1, zero_stage=3, precision="fp32")


def test_check_layout_refuses_the_other_precision_and_passes_checkpoints_without_one(tmp_path: Path) -> None:
    state = {"step": 4, "world_size": 1, "zero_stage": 0, "precision": "bf16"}
    check_layout(tmp_path, 1, state, world=1, zero_stage=0, precision="bf16")
    with pytest.raises(ValueError) as err:
        check_layout(tmp_path, 1, state, world=1, zero_stage=0, precision="fp32")
    msg = str(err.value)
    assert "it was trained in bf16, this run is fp32" in msg and "--precision bf16" in msg
    assert f"--model {tmp_path / 'v1'}" in msg
    # written before the precision was recorded: not checked
    check_layout(tmp_path, 1, {"step": 4, "world_size": 1, "zero_stage": 0}, world=1, zero_stage=0, precision="fp32")


@pytest.mark.parametrize(
    ("files", "refused"),
    [
        # ZeRO-2 on one rank, fp32 and bf16: what --nproc 1 --zero-stage 2 wrote before it ran as stage 0
        (["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], True),
        (["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"], True),
        (["mp_rank_00_model_states.pt"], False),  # stage 0
        (["mp_rank_00_model_states.pt", *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))], False),
        (["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], False),  # Z3
    ],
)
def test_check_layout_of_older_checkpoints(tmp_path: Path, files: list[str], refused: bool) -> None:
    """Without the recorded layout only a one-rank ZeRO-1/2 state is refused (stage 0 cannot load it)."""
    state_dir = tmp_path / "state" / "v3"
    state_dir.mkdir(parents=True)
    for name in files:
        (state_dir / name).touch()
    if refused:
        with pytest.raises(ValueError, match="ZeRO-1/2 on one rank"):
            check_layout(tmp_path, 3, {"step": 4}, world=1, zero_stage=0, precision="fp32")
    else:
        check_layout(tmp_path, 3, {"step": 4}, world=1, zero_stage=0, precision="fp32")
    # Any other run is not checked against an older checkpoint.
    check_layout(tmp_path, 3, {"step": 4}, world=2, zero_stage=2, precision="fp32")
    check_layout(tmp_path, 3, {"step": 4}, world=1, zero_stage=3, precision="fp32")


@pytest.mark.slow
def test_bf16_one_rank_then_resume_checks_layout(tiny_model_dir: Path, tmp_path: Path) -> None:
    """bf16 on 1 rank (ZeRO-2 asked, stage 0 run) trains with a finite grad norm; resuming needs the same layout."""
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(tiny_model_dir, 4))
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"

    def argv(steps: int, zero: int) -> list[str]:
        return train_argv(
            tiny_model_dir, ckpt, source=data, epochs=8, batch_size=2, max_steps=steps, checkpoint_every=3,
            zero_stage=zero, precision="bf16", loss="sft", metrics_jsonl=metrics,
        )  # fmt: skip

    out = run_train(argv(3, 2))
    assert "ZeRO-2 on 1 rank runs as stage 0" in out
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows)
    state = read_state(ckpt, 1)
    assert (state["world_size"], state["zero_stage"], state["precision"]) == (1, 0, "bf16")

    # fp32 cannot load bf16's optimizer state: refused up front, naming both.
    proc = subprocess.run(
        [*argv(6, 2), "--precision", "fp32"], env=train_env(), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "it was trained in bf16, this run is fp32" in proc.stderr and "Traceback" not in proc.stderr

    # ZeRO-3 on 1 rank is another layout: refused before any model loads, as a one-line error.
    proc = subprocess.run(argv(6, 3), env=train_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot resume from" in proc.stderr and "Traceback" not in proc.stderr
    assert "--nproc 1 --zero-stage 0, 1 or 2" in proc.stderr and "--nproc 1 --zero-stage 3" in proc.stderr
    assert ready_versions(ckpt) == [1]
    # Another seed reads the file in another order: the saved row count would name other rows, so refused.
    proc = subprocess.run(
        [*argv(6, 2), "--seed", "1"], env=train_env(), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "shuffled:0 order and this run reads it in shuffled:1 order" in proc.stderr
    assert "Traceback" not in proc.stderr and ready_versions(ckpt) == [1]

    # ZeRO-1 asked on 1 rank is the same stage 0: it resumes (optimizer state included) and trains on.
    run_train(argv(6, 1))
    assert ready_versions(ckpt) == [1, 2]
    assert json.loads((ckpt / "v2" / STATE_FILE).read_text())["resumed_from"] == 1
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["grad_norm"]) for r in rows)


@pytest.mark.slow
def test_auto_precision_resolves_for_this_device_and_is_recorded(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(tiny_model_dir, 2))
    ckpt = tmp_path / "ckpt"
    out = run_train(
        train_argv(tiny_model_dir, ckpt, source=data, batch_size=2, max_steps=1, checkpoint_every=1, precision="auto")
    )
    expected = resolve_precision("auto", native_bf16(torch.device("cpu")))
    assert read_state(ckpt, 1)["precision"] == expected
    assert f'"precision": "{expected}"' in out  # the resolved config as logged
