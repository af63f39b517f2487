"""Checkpoints: a loadable HF folder `v{N}/` per policy version plus DeepSpeed training state to resume from.

Layout under `checkpoint_dir`:
  v{N}/           safetensors + config + tokenizer + trainer_state.json, then the READY marker (written last)
  state/v{N}/     DeepSpeed's optimizer/scheduler/module state (ZeRO partitions as they are)
The weights folder is written under a temporary name and renamed, so a reader (the rewrite service) never
sees a partial `v{N}/`; a `v{N}` without READY — a crash mid-save — is ignored and overwritten.
trainer_state.json records the world size and the effective ZeRO stage, because DeepSpeed's state is saved per
rank in that stage's layout: a resume with another layout is refused up front (`check_layout`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as torch_dist

log = logging.getLogger("mindgap.trainer.checkpoint")

READY = "READY"
STATE_FILE = "trainer_state.json"
_VERSION_DIR = re.compile(r"^v(\d+)$")


def weights_dir(root: Path, version: int) -> Path:
    """The HF folder of policy `version`."""
    return root / f"v{version}"


def state_root(root: Path) -> Path:
    """Where DeepSpeed's training states live (one tag per version)."""
    return root / "state"


def ready_versions(root: Path) -> list[int]:
    """Versions with a READY weights folder and a training state, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _VERSION_DIR.match(child.name)
        if m and (child / READY).is_file() and (state_root(root) / child.name).is_dir():
            found.append(int(m.group(1)))
    return sorted(found)


def read_state(root: Path, version: int) -> dict[str, Any]:
    """The trainer_state.json of a version (step, stream position, ids trained in its segment…)."""
    data: dict[str, Any] = json.loads((weights_dir(root, version) / STATE_FILE).read_text())
    return data


def check_layout(root: Path, version: int, state: dict[str, Any], world: int, zero_stage: int, precision: str) -> None:
    """Refuse (ValueError) to resume `version` when it was written with another world size, effective ZeRO
    stage or precision (a run's resolved `bf16`/`fp32`; checkpoints written before it was recorded pass)."""
    where = weights_dir(root, version)
    was_precision = state.get("precision")
    if was_precision is not None and was_precision != precision:
        # bf16 runs keep an fp32 master copy in their optimizer state, fp32 runs do not: the two do not load.
        raise ValueError(
            f"cannot resume from {where}: it was trained in {was_precision}, this run is {precision}"
            f" (--precision auto picks by device). Resume with --precision {was_precision}, or start a new"
            f" --checkpoint-dir with --model {where} (weights only)"
        )
    if "world_size" not in state or "zero_stage" not in state:
        # Written before the layout was recorded. One case is known not to load, and it is the default run
        # of those versions: ZeRO-1/2 on one rank, which now runs as stage 0 (DeepSpeed fails obscurely there).
        if world == 1 and zero_stage == 0 and _one_rank_zero12(state_root(root) / f"v{version}"):
            raise ValueError(
                f"cannot resume from {where}: its DeepSpeed state is ZeRO-1/2 on one rank, written before one rank"
                " ran those as stage 0, and stage 0 cannot load it. Start a new --checkpoint-dir with"
                f" --model {where} (weights only: step, optimizer state and source position start over)"
            )
        return
    was = (int(state["world_size"]), int(state["zero_stage"]))
    if was == (world, zero_stage):
        return
    raise ValueError(
        f"cannot resume from {where}: it was written by {_layout(*was)}, this run is {_layout(world, zero_stage)}."
        " DeepSpeed saves optimizer state per rank in its ZeRO stage's layout: resume with the checkpoint's"
        f" --nproc/--zero-stage, or start a new --checkpoint-dir with --model {where} (weights only)"
    )


def _layout(world: int, stage: int) -> str:
    # On one rank, ZeRO-1/2 run as stage 0 (trainer.zero.effective_zero_stage): any of those flags fits.
    flags = "0, 1 or 2" if world == 1 and stage == 0 else str(stage)
    return f"world size {world} at ZeRO stage {stage} (--nproc {world} --zero-stage {flags})"


def _one_rank_zero12(state_dir: Path) -> bool:
    # DeepSpeed's file names: ZeRO-1/2/3 write one [bf16_]zero_pp_rank_<r>_…_optim_states.pt per rank, ZeRO-3
    # also a zero_pp_rank_<r>_…_model_states.pt per rank; stage 0 writes neither.
    optim = list(state_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    return len(optim) == 1 and not list(state_dir.glob("*zero_pp_rank_*_model_states.pt"))


def save(engine: Any, tokenizer: Any, root: Path, version: int, state: dict[str, Any], is_main: bool) -> Path:
    """Write training state and the consolidated HF folder of `version` (collective: every rank calls it)."""
    tag = f"v{version}"
    engine.save_checkpoint(str(state_root(root)), tag=tag, client_state={"version": version}, save_latest=False)
    if engine.zero_optimization_partition_weights():
        # ZeRO-3: gather the partitions layer by layer into a full state dict on rank 0 (collective).
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if is_main else None
    final = weights_dir(root, version)
    if is_main:
        tmp = root / f".{tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if final.exists():  # left by a run that crashed before READY
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_synced(final / READY, f"{version}\n")
        log.info("checkpoint v%d written to %s", version, final)
    torch_dist.barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` versions (weights and state); rank 0 only."""
    for version in ready_versions(root)[:-keep]:
        shutil.rmtree(weights_dir(root, version), ignore_errors=True)
        shutil.rmtree(state_root(root) / f"v{version}", ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
