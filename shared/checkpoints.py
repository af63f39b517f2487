"""Checks on an HF safetensors checkpoint folder that need no torch: complete files, tensor names, shapes.

Used before swapping weights into a running engine, where finding a bad file midway is fatal.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

# name -> shape of every tensor in a checkpoint
CheckpointShapes = dict[str, tuple[int, ...]]

_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


class CheckpointError(ValueError):
    """A weights folder that cannot replace the served weights (missing, truncated, other shapes)."""


def checkpoint_shapes(folder: Path) -> CheckpointShapes:
    """Tensor shapes of the safetensors checkpoint in `folder`, checking that every file is complete."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {folder}")
    shapes: CheckpointShapes = {}
    for file in files:
        shapes.update(_safetensors_shapes(file))
    return shapes


def check_same_shapes(new: CheckpointShapes, reference: CheckpointShapes, path: str) -> None:
    """Raise CheckpointError unless `new` has exactly the tensors and shapes of `reference`."""
    problems = [f"missing {name}" for name in sorted(reference.keys() - new.keys())]
    problems += [f"unexpected {name}" for name in sorted(new.keys() - reference.keys())]
    problems += [
        f"{name} has shape {list(new[name])}, expected {list(shape)}"
        for name, shape in sorted(reference.items())
        if name in new and new[name] != shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"checkpoint {path} does not fit the served model: {shown}")


def _safetensors_shapes(file: Path) -> CheckpointShapes:
    """Shapes from one safetensors header; the file's size must match what the header promises."""
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise CheckpointError(f"{file}: truncated header")
            header: dict[str, Any] = json.loads(handle.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
    shapes: CheckpointShapes = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
            nbytes = math.prod(shape) * _SAFETENSORS_DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file}: bad header entry for {name} ({exc})") from exc
        if end - start != nbytes:
            raise CheckpointError(f"{file}: {name} occupies {end - start} bytes, its shape needs {nbytes}")
        shapes[name] = shape
        data_end = max(data_end, end)
    if size != 8 + header_len + data_end:
        raise CheckpointError(f"{file}: {size} bytes on disk, header says {8 + header_len + data_end} (truncated?)")
    return shapes
