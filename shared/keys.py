"""Every Redis key name mindgap uses, in one place, under one configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass

TRAINER_GROUP = "trainer"
REWRITER_GROUP = "rewriters"


@dataclass(frozen=True)
class Keys:
    """Key names under `prefix` (``mindgap`` by default)."""

    prefix: str = "mindgap"

    @property
    def examples(self) -> str:
        """Stream of example records; consumer group ``trainer``."""
        return f"{self.prefix}:examples"

    @property
    def examples_holds(self) -> str:
        """Sorted set job id → ms time of the job's oldest examples entry: the stream is not trimmed past it
        while the job lives (its results refer to the entries)."""
        return f"{self.prefix}:examples:holds"

    @property
    def tasks(self) -> str:
        """Namespace of the task streams of problem chunks: one stream per job (see `job_tasks`)."""
        return f"{self.prefix}:tasks"

    @property
    def jobs(self) -> str:
        """Sorted set of job ids scored by creation time."""
        return f"{self.prefix}:jobs"

    def job(self, job_id: str) -> str:
        """Hash with a job's state, spec and counters."""
        return f"{self.prefix}:job:{job_id}"

    def job_problems(self, job_id: str) -> str:
        """List of a job's problems (JSON), indexed by row number."""
        return f"{self.prefix}:job:{job_id}:problems"

    def job_results(self, job_id: str) -> str:
        """Hash chunk key (``epoch:chunk``) → ``first last``: where each committed chunk's examples sit in the
        examples stream (a job's results are references; the records are stored once, in the stream)."""
        return f"{self.prefix}:job:{job_id}:results"

    def job_published(self, job_id: str) -> str:
        """Set of the example ids `shared.streams.publish_examples` added for a job: its idempotency check."""
        return f"{self.prefix}:job:{job_id}:published"

    def job_done(self, job_id: str) -> str:
        """Set of finished chunk ids (per epoch) of a job: makes chunk processing idempotent."""
        return f"{self.prefix}:job:{job_id}:done"

    def job_errors(self, job_id: str) -> str:
        """List of row-level errors of a job (JSON)."""
        return f"{self.prefix}:job:{job_id}:errors"

    def job_tasks(self, job_id: str) -> str:
        """Stream of one job's problem chunks (consumer group ``rewriters``): one stream per job, so a
        replica can take chunks round-robin across jobs."""
        return f"{self.tasks}:{job_id}"

    def job_versions(self, job_id: str) -> str:
        """Set of policy versions that made a job's examples."""
        return f"{self.prefix}:job:{job_id}:versions"

    def job_chunk_errors(self, job_id: str) -> str:
        """Hash task-entry id → last processing error, the reason given when it is dead-lettered."""
        return f"{self.prefix}:job:{job_id}:chunk_errors"

    @property
    def jobs_expiring(self) -> str:
        """Sorted set of finished job ids scored by when their keys expire: prunes the `jobs` index."""
        return f"{self.prefix}:jobs:expiring"

    @property
    def active_jobs(self) -> str:
        """Set of ids of jobs that still have chunks to run (queued or running)."""
        return f"{self.prefix}:jobs:active"

    @property
    def policy(self) -> str:
        """Hash with the current policy ``version`` and checkpoint ``path``."""
        return f"{self.prefix}:policy"

    @property
    def policy_events(self) -> str:
        """Pub/sub channel announcing new policy versions."""
        return f"{self.prefix}:policy:events"

    @property
    def deadletter(self) -> str:
        """Stream of entries that failed too many deliveries, with the reason."""
        return f"{self.prefix}:deadletter"

    def trainer_state(self, run: str) -> str:
        """Hash with a trainer run's published progress (step, loss, version)."""
        return f"{self.prefix}:trainer:{run}"
