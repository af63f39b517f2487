"""Announcements to Redis (rank 0): the new policy version after each checkpoint, and run progress.

A policy announcement waits out a Redis outage (`shared.retry`): the checkpoint's entries are acked only
after it. Progress is best effort: a step is never held up for a status line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.config import redact_url_credentials
from shared.keys import Keys
from shared.retry import TRANSIENT, retry_sync, sync_redis

log = logging.getLogger("mindgap.trainer.publish")

GAP_PREFIX = "gap/"  # step metrics `gap/<stage>/<metric>` (trainer.losses.gap_metrics), in progress too


def gap_line(metrics: Mapping[Any, Any]) -> str:
    """The per-stage policy gap of a step in a few words, from its `gap/<stage>/<metric>` entries.

    E.g. "self nll 0.41 p<0.1 6% ess 0.99 · expert nll 1.32 p<0.1 25%"; `ess` is the token ratios'
    normalised ESS (stages with behaviour log-probs only). Values may be numbers or their text (a
    Redis hash); "" when there are none.
    """
    parts = []
    for stage in ("self", "guided", "expert"):
        nll, low, ess = (metrics.get(f"{GAP_PREFIX}{stage}/{m}") for m in ("nll", "share_below_p", "is_ratio_ess"))
        if nll is None or low is None:
            continue
        text = f"{stage} nll {float(nll):.2f} p<0.1 {100 * float(low):.0f}%"
        parts.append(text + (f" ess {float(ess):.2f}" if ess is not None else ""))
    return " · ".join(parts)


class Announcer:
    """Sets `<prefix>:policy`, publishes on `<prefix>:policy:events`, and keeps `<prefix>:trainer:<run>` current."""

    def __init__(self, url: str, keys: Keys, run: str) -> None:
        self.redis = sync_redis(url)
        self.keys = keys
        self.run = run

    def policy(self, version: int, path: Path) -> None:
        """Announce checkpoint `path` as policy `version` (hash and event in one transaction)."""
        event = json.dumps({"version": version, "path": str(path.resolve()), "time": time.time()})

        def announce() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.keys.policy, mapping={"version": version, "path": str(path.resolve()), "time": time.time()})
            pipe.publish(self.keys.policy_events, event)
            pipe.execute()

        retry_sync(announce, f"announcing policy v{version}")

    def progress(self, fields: dict[str, Any]) -> None:
        """Overwrite the run's progress hash (step, loss, version, …) for status lines."""
        mapping: dict[str | bytes, str | float] = {k: str(v) for k, v in fields.items()}
        mapping["time"] = time.time()
        try:
            self.redis.hset(self.keys.trainer_state(self.run), mapping=mapping)  # type: ignore[arg-type]
        except TRANSIENT as exc:
            log.warning("progress not published, Redis unavailable: %s", redact_url_credentials(str(exc)))

    def close(self) -> None:
        """Close the connection."""
        self.redis.close()
