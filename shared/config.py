"""Configuration: one pydantic-settings class per process, read from TOML file + env (MINDGAP_…) + CLI.

Precedence, highest first: CLI flags (passed as init kwargs), environment, TOML file, defaults.
Unknown keys are rejected everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

log = logging.getLogger("mindgap.config")

GuidanceMode = Literal["solution", "answer", "hint"]
ExpertFormat = Literal["raw", "boxed"]

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
    expert_format: ExpertFormat = Field(
        "raw",
        description="expert demonstrations as written (raw) or in the solve prompt's convention (boxed: GSM8K"
        " calculator notes <<…>> removed, a final `#### X` written as \\boxed{X}, a bare answer boxed)",
    )
    guidance_filter: bool = Field(
        True,
        description="reject correct guided responses that lean on the guidance (docs/rewrite.md, 'the"
        " guidance-dependence filter'); the eight signals below",
    )
    guidance_echo_words: int = Field(
        4,
        ge=0,
        description="reject a guided response repeating this many consecutive words of the guided prompt's"
        " own wording (its framing and instruction, not in the plain prompt); 0 = off",
    )
    guidance_copy_words: int = Field(
        12,
        ge=0,
        description="reject a guided response copying this many consecutive words of the reference"
        " solution or hint shown (spans of the question excepted); 0 = off",
    )
    guidance_answer_first: bool = Field(
        True, description="reject a guided response that states the (numeric) gold answer before any work"
    )
    guidance_arithmetic: bool = Field(
        True,
        description="reject a guided response that writes an equation with wrong arithmetic ('8 - 6 = 4',"
        " '11 = 11/5', '42 is indeed 13'): its correct answer did not come from its own working",
    )
    guidance_unworked: bool = Field(
        True,
        description="reject a guided response whose (numeric) gold answer is the result of none of its own"
        " expressions ('5 + 6 = 11', '8 x 2 gives 16'): it was stated, not worked out",
    )
    guidance_addresses: bool = Field(
        True,
        description="reject a guided response that talks about a solution it was shown or to its author"
        " ('your solution', 'the original solution', 'you have correctly'): the plain prompt showed none",
    )
    guidance_other_answer: bool = Field(
        True,
        description="reject a guided response that states an answer other than the (numeric) gold one it was"
        " graded on ('The answer is 2. … Final answer: 6'): it contradicts itself",
    )
    guidance_max_logprob_gain: float | None = Field(
        0.7,
        gt=0.0,
        description="reject a guided response with `guidance_gain_window` consecutive tokens that are on average"
        " more than this many nats more likely after the guided prompt than after the plain one (temperature 1;"
        " two scoring passes per correct guided response the text signals pass); null = off",
    )
    guidance_gain_window: int = Field(8, ge=1, description="tokens per window of the likelihood signal")
    score: bool = Field(
        False,
        description="score every kept response on the training prompt (the records' target_logprobs); costs"
        " a prefill per example and nothing reads them by default (see docs/rewrite.md, 'Scoring')",
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


ENV_PREFIX = "MINDGAP_"


def warn_deprecated(old: str, new: str, where: str = "") -> None:
    """Log (on stderr even before logging is set up) that the setting `old` is deprecated in favour of `new`."""
    log.warning("%s%s is deprecated and will be removed in the next release: use %s", where, old, new)


class _RenamedKeys(PydanticBaseSettingsSource):
    """Another source's values with deprecated keys moved to their new names (each with a warning)."""

    def __init__(
        self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource, renames: dict[str, str], where: str
    ) -> None:
        super().__init__(settings_cls)
        self.inner, self.renames, self.where = inner, renames, where

    def _set_current_state(self, state: dict[str, Any]) -> None:
        super()._set_current_state(state)
        self.inner._set_current_state(state)

    def _set_settings_sources_data(self, states: dict[str, dict[str, Any]]) -> None:
        super()._set_settings_sources_data(states)
        self.inner._set_settings_sources_data(states)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        data = dict(self.inner())
        for old, new in self.renames.items():
            if old in data:
                warn_deprecated(repr(old), repr(new), self.where)
                value = data.pop(old)
                data.setdefault(new, value)
        return data


class _DeprecatedEnv(PydanticBaseSettingsSource):
    """`MINDGAP_<OLD>` environment variables of deprecated keys, read as their new keys (with a warning)."""

    def __init__(self, settings_cls: type[BaseSettings], renames: dict[str, str]) -> None:
        super().__init__(settings_cls)
        self.renames = renames

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env = {name.upper(): value for name, value in os.environ.items()}
        data: dict[str, Any] = {}
        for old, new in self.renames.items():
            name = f"{ENV_PREFIX}{old.upper()}"
            if name in env:
                warn_deprecated(name, f"{ENV_PREFIX}{new.upper()}")
                data[new] = env[name]
        return data


class MindgapSettings(BaseSettings):
    """Base of every process config: TOML + env + CLI, unknown keys rejected.

    `deprecated_keys` (old key → new key) keeps an old name working for one release with a warning:
    as a keyword, a TOML key and a `MINDGAP_<OLD>` variable (the new name wins where both are set).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    # set per load() call so the TOML source knows which file to read
    _toml_file: ClassVar[Path | None] = None
    deprecated_keys: ClassVar[dict[str, str]] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        renames = cls.deprecated_keys
        toml = None if cls._toml_file is None else TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file)
        if not renames:
            return (init_settings, env_settings) if toml is None else (init_settings, env_settings, toml)
        sources: list[PydanticBaseSettingsSource] = [
            _RenamedKeys(settings_cls, init_settings, renames, ""),
            env_settings,
            _DeprecatedEnv(settings_cls, renames),
        ]
        if toml is not None:
            sources.append(_RenamedKeys(settings_cls, toml, renames, f"{cls._toml_file}: "))
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
