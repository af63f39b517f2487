"""`mindgap train`: fine-tune with DeepSpeed ZeRO on an examples stream or file; `--nproc N` runs N ranks via torchrun.

`--nproc N` relaunches as `torchrun --nproc-per-node N -m trainer …`: `trainer/__main__.py` parses the
same options (flag = config key in kebab case) on every rank, so multi-node torchrun rendezvous works too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from mindgap.cli import app, fail, load_config, setup_logging

_NO_FORWARD = {"nproc", "verbose"}
# old flag → new flag, accepted for one release with a warning (not listed in --help)
DEPRECATED_FLAGS = {"--prefix": "--key-prefix"}


class TrainCommand(TyperCommand):
    """The `train` command, which also takes the deprecated flag names in DEPRECATED_FLAGS."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # Any: typer vendors click's Context
        from shared.config import warn_deprecated

        renamed: list[str] = []
        for i, arg in enumerate(args):
            if arg == "--":  # everything after it is a value
                renamed += args[i:]
                break
            flag, eq, value = arg.partition("=")
            if flag in DEPRECATED_FLAGS:
                warn_deprecated(flag, DEPRECATED_FLAGS[flag])
                arg = DEPRECATED_FLAGS[flag] + eq + value
            renamed.append(arg)
        return super().parse_args(ctx, renamed)


def train(
    ctx: typer.Context,
    source: str | None = typer.Option(None, help="'redis' (examples stream, group 'trainer') or a JSONL/parquet file"),
    model: str | None = typer.Option(None, help="HF id, local path or 'default' (SmolLM2-135M-Instruct)"),
    loss: str | None = typer.Option(None, help="sft | dft | is"),
    is_level: str | None = typer.Option(None, help="importance weights per 'token' or per 'sequence'"),
    is_geometric: bool | None = typer.Option(
        None, "--is-geometric/--no-is-geometric", help="sequence level: per-token geometric mean of the ratio"
    ),
    is_clip: float | None = typer.Option(None, help="truncate importance weights above at C"),
    is_clip_min: float | None = typer.Option(
        None, help="truncate importance weights below (default 1/C at sequence level, none at token level)"
    ),
    expert_fallback: str | None = typer.Option(None, help="loss for expert records under --loss is: dft | sft"),
    kl_coef: float | None = typer.Option(None, help="β of the k3 KL penalty to the frozen reference (0 = off)"),
    ref_model: str | None = typer.Option(None, help="KL reference model (default: --model)"),
    zero_stage: int | None = typer.Option(
        None, help="DeepSpeed ZeRO stage 0-3 (1 and 2 run as 0 on a single rank: nothing to partition)"
    ),
    nproc: int | None = typer.Option(None, help="ranks on this machine; > 1 relaunches through torchrun"),
    max_steps: int | None = typer.Option(None, help="optimizer steps (counted across resumes)"),
    checkpoint_dir: Path | None = typer.Option(None, help="where v{N}/ weights and training state go"),
    checkpoint_every: int | None = typer.Option(None, help="steps between checkpoints (= policy versions)"),
    keep_checkpoints: int | None = typer.Option(None, help="newest checkpoints kept"),
    resume: bool | None = typer.Option(None, "--resume/--no-resume", help="continue from the newest checkpoint"),
    max_staleness: int | None = typer.Option(None, help="examples older than current version − S are affected"),
    staleness_mode: str | None = typer.Option(None, help="drop | downweight"),
    staleness_decay: float | None = typer.Option(None, help="downweight factor per version beyond S"),
    lr: float | None = typer.Option(None, help="peak learning rate"),
    min_lr_ratio: float | None = typer.Option(None, help="cosine floor as a fraction of --lr"),
    warmup_steps: int | None = typer.Option(None, help="linear warm-up steps"),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay"),
    grad_clip: float | None = typer.Option(None, help="gradient-norm clip (0 = off)"),
    batch_size: int | None = typer.Option(None, help="examples per optimizer step over all ranks"),
    micro_batch_size: int | None = typer.Option(None, help="examples per forward pass per rank"),
    grad_accum: int | None = typer.Option(None, help="micro-batches per rank per step (derived from --batch-size)"),
    max_seq_len: int | None = typer.Option(None, help="longer prompt+completion records are rejected"),
    precision: str | None = typer.Option(None, help="auto | bf16 | fp32 (auto: bf16 where the device has it natively)"),
    grad_checkpointing: bool | None = typer.Option(
        None, "--grad-checkpointing/--no-grad-checkpointing", help="recompute activations in backward"
    ),
    seed: int | None = typer.Option(None, help="torch seed and the file source's shuffle"),
    epochs: int | None = typer.Option(None, help="passes over a file source"),
    shuffle: bool | None = typer.Option(
        None, "--shuffle/--no-shuffle", help="file source: a fresh order each epoch from --seed (default on)"
    ),
    redis_url: str | None = typer.Option(None, help="Redis URL"),
    key_prefix: str | None = typer.Option(None, help="prefix of every Redis key (default mindgap)"),
    consumer: str | None = typer.Option(None, help="consumer name in group 'trainer' (reuse it to resume)"),
    run_name: str | None = typer.Option(None, help="progress goes to <key-prefix>:trainer:<run-name>"),
    publish: bool | None = typer.Option(
        None, "--publish/--no-publish", help="announce checkpoints in Redis (default: with --source redis)"
    ),
    idle_exit_s: float | None = typer.Option(None, help="redis: finish after S seconds without new entries"),
    log_every: int | None = typer.Option(None, help="steps between metric lines"),
    tensorboard_dir: Path | None = typer.Option(None, help="TensorBoard log folder"),
    metrics_jsonl: Path | None = typer.Option(None, help="append one JSON line of metrics per logged step"),
    config: Path | None = typer.Option(None, "--config", help="TOML config file"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Fine-tune on example records (SFT, DFT or importance-weighted), publishing checkpoints as policy versions."""
    setup_logging(verbose)
    from trainer.config import TrainerConfig

    overrides = {k: v for k, v in ctx.params.items() if k not in ("config", "verbose")}
    cfg = load_config(TrainerConfig, config, **overrides)
    if cfg.nproc > 1 and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(_relaunch(ctx, cfg.nproc))
    from trainer.train import run

    try:
        run(cfg)
    except ValueError as exc:  # configuration problems found once the world size is known
        raise fail(str(exc)) from None


def _relaunch(ctx: typer.Context, nproc: int) -> int:
    """Run this same command as `torchrun --nproc-per-node N -m trainer <the given options>`; its exit status."""
    import torch

    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    argv += ["-m", "trainer", *_forward_flags(ctx)]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.Popen(argv, env=env)
    # torchrun passes SIGTERM/SIGINT on to every rank, which then stop gracefully (final checkpoint).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    return proc.wait()


def _forward_flags(ctx: typer.Context) -> list[str]:
    """The options given on this command line, as `python -m trainer` flags (nproc dropped: ranks must not relaunch).

    pydantic-settings' parser on the ranks takes `--x/--no-x` for a plain bool but `--x true|false` for
    an optional one (`publish`: None means "decide from the source").
    """
    from trainer.config import TrainerConfig

    flags: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if value is None or param.name in _NO_FORWARD or not param.opts[0].startswith("--"):
            continue
        if getattr(param, "is_flag", False):
            field = TrainerConfig.model_fields.get(param.name or "")
            if field is not None and not field.is_required() and field.default is None:
                flags += [param.opts[0], "true" if value else "false"]
            else:
                flags.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            flags += [param.opts[0], str(value)]
    if ctx.params.get("verbose"):
        flags.append("--verbose")
    return flags


app.command("train", cls=TrainCommand)(train)
