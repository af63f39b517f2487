"""`mindgap serve` (the REST service) and its client commands `submit`, `status`, `results`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mindgap.cli import app, fail, hard_exit, load_config, setup_logging

if TYPE_CHECKING:
    from services.client import MindgapClient
    from shared.wire import JobStatus

log = logging.getLogger("mindgap.service")

URL_OPTION = typer.Option("http://127.0.0.1:8000", "--url", envvar="MINDGAP_URL", help="service base URL")
KEY_OPTION = typer.Option(None, "--api-key", envvar="MINDGAP_API_KEY", help="bearer key (env MINDGAP_API_KEY)")


@app.command()
def serve(
    host: str | None = typer.Option(None, help="bind address (default 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default 8000)"),
    model: str | None = typer.Option(None, help="HF id, local path or 'default' (SmolLM2-135M-Instruct)"),
    config: Path | None = typer.Option(None, "--config", help="TOML config file (ServiceConfig keys)"),
    backend: str | None = typer.Option(None, help="inference engine: vllm (default) or fake (tests)"),
    insecure: bool = typer.Option(False, "--insecure", help="allow a non-loopback host without API keys"),
    redis_url: str | None = typer.Option(None, help="Redis URL (env MINDGAP_REDIS_URL)"),
    key_prefix: str | None = typer.Option(None, help="prefix of every Redis key (default mindgap)"),
    allowed_root: Path | None = typer.Option(None, help="folder that server-side job paths must be under"),
    chunk_size: int | None = typer.Option(None, help="problems per task chunk"),
    max_inflight_chunks: int | None = typer.Option(None, help="chunks on the engine at once"),
    claim_idle_ms: int | None = typer.Option(None, help="take over chunks idle this long (dead replica)"),
    fake_delay_s: float | None = typer.Option(None, help="fake backend only: seconds per engine call"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Serve the rewrite API: jobs over REST, cross-job batching, examples into the Redis stream."""
    from services.auth import check_bind
    from services.settings import ServiceConfig

    setup_logging(verbose)
    overrides: dict[str, Any] = {
        "host": host,
        "port": port,
        "backend": backend,
        "insecure": insecure or None,
        "redis_url": redis_url,
        "key_prefix": key_prefix,
        "allowed_root": allowed_root,
        "chunk_size": chunk_size,
        "max_inflight_chunks": max_inflight_chunks,
        "claim_idle_ms": claim_idle_ms,
        "fake_delay_s": fake_delay_s,
    }
    if model is not None:
        overrides["engine"] = {"model": model}  # merged into the file's/env's engine table
    cfg = load_config(ServiceConfig, config, **overrides)
    try:
        check_bind(cfg)
    except ValueError as exc:
        raise fail(str(exc)) from None
    code = _serve(cfg)
    if cfg.backend == "vllm":
        hard_exit(code)  # the vLLM CPU engine can abort in interpreter teardown
    if code:
        raise typer.Exit(code)


class _EngineStartFailure(logging.Filter):
    """Takes an engine's start failure (EngineStartError) out of uvicorn's startup traceback, to print it as one
    error line: the error names the cause and the setting to change, the traceback adds nothing."""

    MARK = "EngineStartError: "

    def __init__(self) -> None:
        super().__init__()
        self.message: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if self.MARK not in text:
            return True
        self.message = " ".join(text.rsplit(self.MARK, 1)[1].split())
        return False


def _serve(cfg: Any) -> int:
    import uvicorn

    from services.app import create_app

    server = uvicorn.Server(
        uvicorn.Config(create_app(cfg), host=cfg.host, port=cfg.port, log_config=None, timeout_graceful_shutdown=60)
    )
    engine_failure = _EngineStartFailure()
    logging.getLogger("uvicorn.error").addFilter(engine_failure)
    try:
        server.run()  # SIGINT/SIGTERM: stop accepting, drain connections, then the lifespan drains the worker
    except SystemExit:  # uvicorn exits (status 3) when the app's startup failed
        if engine_failure.message is None:
            raise
    if engine_failure.message is not None:
        fail(engine_failure.message)  # printed here; the exit status is returned
        return 1
    return 0 if server.started else 1


def _client(url: str, api_key: str | None) -> MindgapClient:
    from services.client import MindgapClient

    try:
        return MindgapClient(url, api_key)
    except ValueError as exc:  # a key that cannot be sent in a header: the user's to fix, not the service's
        raise fail(f"--api-key: {exc}") from None


@contextmanager
def _writing(output: Path) -> Iterator[None]:
    """Turn a failure to write `output` (no such folder, no permission, disk full) into one error line."""
    try:
        yield
    except OSError as exc:
        raise fail(f"-o: cannot write {output}: {exc.strerror or exc}") from None


def _submit_dataset(client: MindgapClient, name: str, split: str | None, job_args: dict[str, Any]) -> Any:
    """A local HF datasets folder or a hub id: read here with the one reader, uploaded as JSONL.

    The service takes files, not datasets; rows go up as they are, so the service's reader maps them
    exactly as `mindgap rewrite` would.
    """
    import tempfile

    from shared.dataio import DataError, iter_rows

    try:
        rows = [row for _, row in iter_rows(name, split) if not isinstance(row, Exception)]
    except DataError as exc:
        raise fail(f"FILE: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="mindgap-submit-") as tmp:
        upload = Path(tmp) / f"{Path(name).name or 'dataset'}.jsonl"
        with upload.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        return _service_call(client.submit_file, upload, **job_args)


def _service_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a client call, turning service and connection errors into one-line CLI errors."""
    import httpx

    from services.client import ServiceError

    try:
        return fn(*args, **kwargs)
    except ServiceError as exc:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        raise fail(f"service answered {exc.status}: {detail}") from None
    except httpx.TransportError as exc:
        raise fail(f"cannot reach the service: {exc}") from None


@app.command()
def submit(
    file: str = typer.Argument(
        ..., help="JSONL/JSON/parquet file, HF datasets folder or hub id (or a server path with --server-path)"
    ),
    fields: list[str] | None = typer.Option(None, help="field mapping, e.g. question=problem (repeatable)"),
    k: int | None = typer.Option(None, "--k", help="self-samples per problem"),
    resolve_attempts: int | None = typer.Option(None, help="guided attempts per unsolved problem"),
    keep: int | None = typer.Option(None, help="correct responses kept per problem at most"),
    temperature: float | None = typer.Option(None),
    top_p: float | None = typer.Option(None),
    max_tokens: int | None = typer.Option(None, help="response length cap"),
    guidance: str | None = typer.Option(None, help="guided prompt mode: solution | answer | hint"),
    mode: str = typer.Option("once", help="once, or online (cycle the dataset under the newest policy)"),
    epochs: int | None = typer.Option(None, help="online: passes over the dataset (default: until cancelled)"),
    name: str | None = typer.Option(None, help="label shown in job listings"),
    server_path: bool = typer.Option(False, "--server-path", help="FILE is a path under the server's allowed root"),
    split: str | None = typer.Option(None, help="split of a local HF datasets folder or hub id (default: train)"),
    wait: bool = typer.Option(False, "--wait", help="show progress until the job finishes"),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Submit a dataset as a job; print its id (and with --wait, follow it to the end)."""
    from shared.dataio import DataError, parse_field_specs

    try:
        field_map = parse_field_specs(fields).mapped()
    except DataError as exc:
        raise fail(f"--fields: {exc}") from None
    if mode not in ("once", "online"):
        raise fail(f"--mode: expected once or online, got {mode!r}")
    stage: dict[str, Any] = {"k": k, "resolve_attempts": resolve_attempts, "keep": keep, "temperature": temperature}
    stage |= {"top_p": top_p, "max_tokens": max_tokens, "guidance": guidance}
    params = {key: v for key, v in stage.items() if v is not None}
    job_args: dict[str, Any] = {"fields": field_map, "params": params, "mode": mode, "epochs": epochs, "name": name}
    with _client(url, api_key) as client:
        if server_path:
            created = _service_call(client.submit_path, file, **job_args)
        elif Path(file).is_file():
            created = _service_call(client.submit_file, Path(file), **job_args)
        else:
            created = _submit_dataset(client, file, split, job_args)
        for err in created.errors:
            typer.secho(f"warning: line {err.line}: {err.message}, row skipped", err=True, fg=typer.colors.YELLOW)
        typer.echo(created.id)
        if wait:
            status = _follow(client, created.id)
            if status.state != "completed":
                raise fail(f"job {created.id} ended {status.state}: {status.error or ''}".rstrip(": "), code=1)


def _follow(client: MindgapClient, job_id: str) -> JobStatus:
    """Poll a job with a rich progress bar until it finishes."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stages]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as progress:
        task = progress.add_task(job_id, total=None, stages="")

        def show(s: JobStatus) -> None:
            total = s.problems * s.epochs if s.epochs else None
            stages = " ".join(f"{k} {v}" for k, v in s.stages.items())
            state = f"waiting: {s.waiting}" if s.waiting else s.state
            progress.update(task, completed=s.problems_done, total=total, stages=f"{state} · {stages}")

        status: JobStatus = _service_call(client.wait, job_id, poll_s=0.5, on_progress=show)
    return status


@app.command()
def status(
    job: str = typer.Argument(..., help="job id"),
    as_json: bool = typer.Option(False, "--json", help="print the full status as JSON"),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Show a job's state, progress and counts per stage."""
    from rich.console import Console
    from rich.table import Table

    with _client(url, api_key) as client:
        s: JobStatus = _service_call(client.status, job)
    if as_json:
        typer.echo(s.model_dump_json(indent=2))
        return
    progress = f"{100 * s.progress:.1f}%" if s.progress is not None else f"epoch {s.epoch}"
    table = Table(title=f"job {s.id}: {s.state} ({progress})")
    table.add_column("stage")
    table.add_column("problems", justify="right")
    table.add_column("examples", justify="right")
    for stage, n in s.stages.items():
        table.add_row(stage, str(n), str(s.examples[stage]))
    table.add_section()
    table.add_row("dropped / ungradable", f"{s.dropped} / {s.ungradable}", "")
    table.add_row("rows rejected", str(s.rows_rejected), "")
    table.caption = f"{s.problems_done} problems done of {s.problems}; policy versions {s.policy_versions}"
    console = Console()
    console.print(table)
    for err in s.errors:
        console.print(f"[yellow]line {err.line}:[/] {err.message}")
    if s.waiting:
        console.print(f"[yellow]waiting:[/] {s.waiting}")
    if s.error:
        console.print(f"[red]error:[/] {s.error}")


@app.command()
def results(
    job: str = typer.Argument(..., help="job id"),
    output: Path = typer.Option(..., "-o", "--output", help="records out: .jsonl or .parquet"),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Download a job's examples (written atomically: a failed download leaves no partial file)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from shared.dataio import atomic_file

    with _client(url, api_key) as client:
        s: JobStatus = _service_call(client.status, job)
        if output.suffix == ".parquet":
            data: bytes = _service_call(client.results_parquet, job)
            with _writing(output), atomic_file(output) as f:
                f.write(data)
            typer.echo(f"wrote {output}")
            return
        # the file is opened first, so an unwritable -o fails before the download starts; a service error
        # mid-download leaves the block, and the atomic write removes its temp file
        with (
            _writing(output),
            atomic_file(output) as f,
            Progress(
                TextColumn("[bold]downloading"), BarColumn(), MofNCompleteColumn(), console=Console(stderr=True)
            ) as progress,
        ):
            task = progress.add_task("results", total=s.examples_total)

            def download() -> int:
                count = 0
                for ex in client.results(job):
                    f.write(ex.model_dump_json().encode() + b"\n")
                    count += 1
                    progress.advance(task)
                return count

            n: int = _service_call(download)
    typer.echo(f"wrote {n} examples to {output}")
