"""Configuration: one pydantic-settings class per process, read from TOML file + env (MINDGAP_…) + CLI.

Precedence, highest first: CLI flags (passed as init kwargs), environment, TOML file, defaults.
Unknown keys are rejected everywhere.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

log = logging.getLogger("mindgap.config")

GuidanceMode = Literal["solution", "answer", "hint"]

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://[^@/\s]*@", re.IGNORECASE)


def redact_url_credentials(text: str) -> str:
    """`text` with the user:password part of every URL in it (a Redis URL…) replaced by `***`."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>://***@", text)


class StageParams(BaseModel):
    """Parameters of the three stages of Guided Re-solving."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(4, ge=0, description="self-samples per problem on the plain prompt")
    resolve_attempts: int = Field(4, ge=0, description="guided re-solving attempts per unsolved problem")
    keep: int = Field(1, ge=1, description="correct responses kept per problem at most (distinct texts)")
    temperature: float = Field(0.7, gt=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    guidance: GuidanceMode = "solution"
    hint_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="share of the solution shown in `hint` mode")
    rounds: int = Field(
        2, ge=1, description="sampling rounds per stage: later rounds only for problems still short of `keep`"
    )
    expert_fallback: bool = Field(True, description="fall back to the expert demonstration when unsolved")
    score: bool = Field(
        False,
        description="score every kept response on the training prompt (the records' target_logprobs); costs"
        " a prefill per example and nothing reads them by default (see docs/pipeline.md)",
    )


class EngineConfig(BaseModel):
    """Engine options passed through to vLLM."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("default", description="HF id, local path, or 'default' (SmolLM2-135M-Instruct)")
    dtype: str = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    max_model_len: int | None = Field(2048, ge=16)
    enable_prefix_caching: bool = True
    seed: int = 0
    kv_cache_gib: float | None = Field(None, gt=0, description="CPU only: VLLM_CPU_KVCACHE_SPACE in GiB")
    max_num_seqs: int | None = Field(None, ge=1)
    enforce_eager: bool = False


def _is_secret_name(name: str) -> bool:
    """Whether a config field holds credentials (api_keys, admin_keys, hf_token…; not key_prefix)."""
    words = name.lower().split("_")
    return any(w in ("key", "keys", "token", "password", "secret", "secrets") for w in words) and (
        words[-1] != "prefix"
    )


class MindgapSettings(BaseSettings):
    """Base of every process config: TOML + env + CLI, unknown keys rejected."""

    model_config = SettingsConfigDict(
        env_prefix="MINDGAP_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    # set per load() call so the TOML source knows which file to read
    _toml_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Self:
        """Resolve the config from `config_file`, the environment and `overrides` (None values ignored)."""
        if config_file is not None and not config_file.is_file():
            raise FileNotFoundError(f"config file not found: {config_file}")
        cls._toml_file = config_file
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            cls._toml_file = None

    def log_resolved(self, logger: logging.Logger | None = None) -> None:
        """Log the resolved config (secrets masked) once at process start."""
        (logger or log).info("resolved config %s: %s", type(self).__name__, json.dumps(self.redacted()))

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with secret-looking fields masked."""
        data = self.model_dump(mode="json")
        for key in list(data):
            if _is_secret_name(key) and data[key]:
                data[key] = "***"
            elif isinstance(data[key], str):
                data[key] = redact_url_credentials(data[key])
        return data
