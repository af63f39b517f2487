"""One name per setting: every option of a command that resolves a config is named like a key of that config.

The flag is the key in kebab case (`--grace-s` ↔ `grace_s`, `--backend` ↔ `backend`), and the Python
parameter is the key itself. A key may be top-level or a key of a nested table the option fills (`--model`
↔ `engine.model`, `--k` ↔ `stages.k`), so the same word means the same thing in flags, TOML and MINDGAP_… env.
"""

from __future__ import annotations

import typing
from typing import Any

import pytest
import typer
from pydantic import BaseModel

from mindgap.cli import _register, app
from mindgap.evaluation.accuracy import EvalConfig
from mindgap.evaluation.gap import GapConfig
from mindgap.up import UpConfig
from services.offline import RewriteConfig
from services.settings import ServiceConfig
from shared.config import StageParams
from shared.wire import JobSpec
from trainer.config import TrainerConfig

# command → (its config, tables given as plain dicts whose keys are another model's, options that are no key)
COMMANDS: dict[str, tuple[type[BaseModel], dict[str, type[BaseModel]], set[str]]] = {
    "serve": (ServiceConfig, {}, set()),
    "rewrite": (RewriteConfig, {}, set()),
    "train": (TrainerConfig, {}, set()),
    "up": (UpConfig, {"params": StageParams}, set()),
    "eval": (EvalConfig, {}, set()),
    "gap": (GapConfig, {}, set()),
    # a client command: its keys are the job's (JobSpec, params: StageParams); the rest is the connection
    "submit": (JobSpec, {"params": StageParams}, {"file", "server_path", "split", "wait", "url", "api_key"}),
}
NOT_SETTINGS = {"config", "verbose"}  # the config file itself, log level


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (`EngineConfig`, `list[DataSpec]`, `X | None`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def config_keys(model: type[BaseModel], tables: dict[str, type[BaseModel]]) -> set[str]:
    """The model's keys and the keys of its nested tables."""
    keys = set(model.model_fields)
    for name, field in model.model_fields.items():
        for nested in [*_models(field.annotation), *([tables[name]] if name in tables else [])]:
            keys |= set(nested.model_fields)
    return keys


def _command(name: str) -> Any:
    _register()
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_named_like_a_config_key(name: str) -> None:
    model, tables, others = COMMANDS[name]
    keys = config_keys(model, tables)
    wrong = []
    for param in _command(name).params:
        if param.name in NOT_SETTINGS | others:
            continue
        long = [o for o in param.opts if o.startswith("--")]
        flag = long[0][2:] if long else param.name.replace("_", "-")  # an argument has no flag
        negative = [o for o in param.secondary_opts if o.startswith("--")]
        if (
            len(long) > 1
            or flag.replace("-", "_") != param.name
            or param.name not in keys
            or negative not in ([], [f"--no-{flag}"])
        ):
            wrong.append((param.opts, param.secondary_opts, param.name))
    assert not wrong, f"{name}: options not named like a key of {model.__name__}: {wrong}"


def test_the_rule_catches_a_flag_named_unlike_its_key() -> None:
    keys = config_keys(UpConfig, {"params": StageParams})
    assert {"grace_s", "backend", "key_prefix", "k", "max_tokens"} <= keys
    assert not {"grace", "engine", "prefix", "field"} & keys
