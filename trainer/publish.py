"""Announcements to Redis (rank 0): the new policy version after each checkpoint, and run progress."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from shared.keys import Keys


class Announcer:
    """Sets `<prefix>:policy`, publishes on `<prefix>:policy:events`, and keeps `<prefix>:trainer:<run>` current."""

    def __init__(self, url: str, keys: Keys, run: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(url)
        self.keys = keys
        self.run = run

    def policy(self, version: int, path: Path) -> None:
        """Announce checkpoint `path` as policy `version` (hash and event in one transaction)."""
        event = json.dumps({"version": version, "path": str(path.resolve()), "time": time.time()})
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.policy, mapping={"version": version, "path": str(path.resolve()), "time": time.time()})
        pipe.publish(self.keys.policy_events, event)
        pipe.execute()

    def progress(self, fields: dict[str, Any]) -> None:
        """Overwrite the run's progress hash (step, loss, version, …) for status lines."""
        mapping: dict[str | bytes, str | float] = {k: str(v) for k, v in fields.items()}
        mapping["time"] = time.time()
        self.redis.hset(self.keys.trainer_state(self.run), mapping=mapping)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the connection."""
        self.redis.close()
