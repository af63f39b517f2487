"""A small typed Python client of the `/v1` API (httpx, synchronous); the CLI commands are built on it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from shared.retry import DEFAULT_BACKOFF
from shared.schema import Example
from shared.wire import (
    FINISHED_STATES,
    JobCreated,
    JobList,
    JobMode,
    JobStatus,
    PolicyStatus,
    ReloadRecord,
    RewriteResponse,
)


class ServiceError(Exception):
    """The service answered with an error status; `status` and the service's `detail` are kept."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def check_api_key(api_key: str) -> None:
    """ValueError unless `api_key` can travel in an HTTP header: printable ASCII, no spaces or line breaks."""
    # the message names the kind of character, never the key's text
    for c in api_key:
        if c in "\r\n":
            what = "a line break"
        elif c.isspace():
            what = "a space"
        elif not c.isascii():
            what = "a non-ASCII character"
        elif not c.isprintable():
            what = "a control character"
        else:
            continue
        raise ValueError(f"bad API key: it holds {what}; a key is printable ASCII without spaces or line breaks")


def _job(job_id: str, *rest: str) -> str:
    """The path of a job resource, its id escaped so that `?`, `/` or `#` in it stay part of the id."""
    return "/".join(("/v1/jobs", quote(job_id, safe=""), *rest))


class MindgapClient:
    """Calls a mindgap service at `base_url`, with `api_key` as the bearer token when given (ValueError for a
    key that cannot be sent)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if api_key:
            check_api_key(api_key)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> MindgapClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise ServiceError(resp.status_code, detail)
        return resp

    @staticmethod
    def _spec(
        fields: dict[str, str] | None,
        params: dict[str, Any] | None,
        mode: JobMode,
        epochs: int | None,
        name: str | None,
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {"fields": fields or {}, "params": params or {}, "mode": mode}
        if epochs is not None:
            spec["epochs"] = epochs
        if name is not None:
            spec["name"] = name
        return spec

    def submit_file(
        self,
        path: Path,
        fields: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        mode: JobMode = "once",
        epochs: int | None = None,
        name: str | None = None,
    ) -> JobCreated:
        """Upload a local JSONL/JSON/parquet file as a job."""
        spec = self._spec(fields, params, mode, epochs, name)
        with path.open("rb") as f:
            resp = self.http.post("/v1/jobs", data={"spec": json.dumps(spec)}, files={"file": (path.name, f)})
        return JobCreated.model_validate(self._check(resp).json())

    def submit_path(
        self,
        server_path: str,
        fields: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        mode: JobMode = "once",
        epochs: int | None = None,
        name: str | None = None,
    ) -> JobCreated:
        """Create a job from a file on the server, under its allowed root."""
        body = {"path": server_path, **self._spec(fields, params, mode, epochs, name)}
        return JobCreated.model_validate(self._check(self.http.post("/v1/jobs", json=body)).json())

    def submit_rows(
        self,
        rows: Sequence[dict[str, Any]],
        fields: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        mode: JobMode = "once",
        epochs: int | None = None,
        name: str | None = None,
    ) -> JobCreated:
        """Create a job from rows given inline."""
        body = {"rows": list(rows), **self._spec(fields, params, mode, epochs, name)}
        return JobCreated.model_validate(self._check(self.http.post("/v1/jobs", json=body)).json())

    def status(self, job_id: str) -> JobStatus:
        """A job's status."""
        return JobStatus.model_validate(self._check(self.http.get(_job(job_id))).json())

    def jobs(self, limit: int = 100) -> list[JobStatus]:
        """The newest jobs."""
        resp = self._check(self.http.get("/v1/jobs", params={"limit": limit}))
        return JobList.model_validate(resp.json()).jobs

    def wait(
        self,
        job_id: str,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        on_progress: Callable[[JobStatus], None] | None = None,
    ) -> JobStatus:
        """Poll until the job finishes; `on_progress` sees every status on the way.

        The job runs on whatever happens to the connection, so an unreachable service or a 503 (its Redis is
        down) is retried with backoff for up to `DEFAULT_BACKOFF.total_s` before the error is raised.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        unavailable_since: float | None = None
        failures = 0
        while True:
            try:
                status = self.status(job_id)
            except (ServiceError, httpx.TransportError) as exc:
                if isinstance(exc, ServiceError) and exc.status != 503:
                    raise
                unavailable_since = unavailable_since or time.monotonic()
                if time.monotonic() - unavailable_since > DEFAULT_BACKOFF.total_s:
                    raise
                time.sleep(max(poll_s, DEFAULT_BACKOFF.delay(failures)))
                failures += 1
                continue
            unavailable_since, failures = None, 0
            if on_progress is not None:
                on_progress(status)
            if status.state in FINISHED_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.state} after {timeout_s}s")
            time.sleep(poll_s)

    def results(self, job_id: str) -> Iterator[Example]:
        """The job's examples, streamed."""
        with self.http.stream("GET", _job(job_id, "results")) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            for line in resp.iter_lines():
                if line.strip():
                    yield Example.model_validate_json(line)

    def results_parquet(self, job_id: str) -> bytes:
        """The job's examples as a parquet file's bytes."""
        resp = self.http.get(_job(job_id, "results"), params={"format": "parquet"})
        return self._check(resp).content

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job (ServiceError 409 when it already finished)."""
        return JobStatus.model_validate(self._check(self.http.post(_job(job_id, "cancel"))).json())

    def rewrite(
        self,
        rows: Sequence[dict[str, Any]],
        fields: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> RewriteResponse:
        """Rewrite a few rows synchronously."""
        body = {"rows": list(rows), "fields": fields or {}, "params": params or {}}
        return RewriteResponse.model_validate(self._check(self.http.post("/v1/rewrite", json=body)).json())

    def policy(self) -> PolicyStatus:
        """The policy version served and its reload history."""
        return PolicyStatus.model_validate(self._check(self.http.get("/v1/policy")).json())

    def reload(self, path: str, version: int | None = None, allow_rollback: bool = False) -> ReloadRecord:
        """Force a weight reload (admin key); a version not above the served one needs `allow_rollback`."""
        body: dict[str, Any] = {"path": path}
        if version is not None:
            body["version"] = version
        if allow_rollback:
            body["allow_rollback"] = True
        return ReloadRecord.model_validate(self._check(self.http.post("/v1/policy/reload", json=body)).json())

    def ready(self) -> bool:
        """Whether `/readyz` answers 200 (False while the service is unreachable)."""
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False
