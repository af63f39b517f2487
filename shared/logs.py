"""Logging of mindgap's processes: mindgap's own lines at INFO, the libraries' at WARNING unless verbose.

vLLM and transformers set their log levels from environment variables when first imported, and the processes
they and torchrun start (vLLM's engine core, trainer ranks, `mindgap up`'s children) inherit the environment.
So `setup_logging` writes those variables before any such import, and they travel to every child; the loggers
of libraries already imported are set directly. Python warnings that are the libraries' business
(FutureWarning, DeprecationWarning: things to change in *their* code) are hidden the same way.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# The loggers (and their children) of libraries mindgap runs; at WARNING unless verbose.
LIBRARY_LOGGERS = (
    "vllm",
    "DeepSpeed",
    "deepspeed",
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "httpx",
    "httpcore",
    "urllib3",
    "filelock",
)
HIDDEN_WARNINGS = "ignore::FutureWarning,ignore::DeprecationWarning"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def library_env(verbose: bool) -> dict[str, str]:
    """The environment variables that set the libraries' own log levels, in this process and its children."""
    if verbose:
        return {"VLLM_LOGGING_LEVEL": "DEBUG", "TRANSFORMERS_VERBOSITY": "info"}
    return {
        "VLLM_LOGGING_LEVEL": "WARNING",
        "TRANSFORMERS_VERBOSITY": "warning",
        "TORCH_CPP_LOG_LEVEL": "ERROR",  # c10d / gloo notices printed by torch's C++ side
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' weight loading and saving bars (trainer checkpoints)
        "PYTHONWARNINGS": HIDDEN_WARNINGS,
    }


def setup_logging(verbose: bool = False) -> None:
    """Configure this process's logging once: mindgap at INFO (DEBUG with `verbose`), libraries at WARNING.

    Variables the user exported keep their value; `verbose` overrides them.
    """
    for name, value in library_env(verbose).items():
        if verbose:
            os.environ[name] = value
        else:
            os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    if verbose:
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
