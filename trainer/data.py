"""Training data: example records → token tensors, from a file or a Redis consumer group (rank 0 only).

The prompt is rendered by `shared.prompts.render_prompt_ids` — the function the engine scored it with —
and followed by the record's own `completion_token_ids`, so the trainer sees exactly the sampled tokens
and the log-prob lists stay aligned with them. Records that cannot be trained (malformed, misaligned,
too long) are dead-lettered (Redis) or logged with their line (file), and reading goes on.

Delivery contract (Redis): entries stay pending in the group until `commit()` acknowledges them, which
the training loop calls only after a checkpoint containing their updates is published. On restart the
source first replays this consumer's pending entries (XREADGROUP from id 0), skipping those the resumed
checkpoint already includes, then reads new ones (`>`). Redis outages are waited out with backoff
(`shared.retry`); since a read whose reply was lost to a timeout still moved its entries into this
consumer's pending list, every idle poll checks that list (ids only) for entries never handed to the loop
and replays them, so no entry is stranded until the next restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from pydantic import ValidationError
from torch import Tensor

from shared.dataio import read_examples
from shared.keys import TRAINER_GROUP, Keys
from shared.prompts import render_prompt_ids
from shared.retry import async_redis, retry_async
from shared.schema import Example, Stage

log = logging.getLogger("mindgap.trainer.data")

T = TypeVar("T")
_STAGE_INDEX = {s.value: i for i, s in enumerate(Stage)}  # the row order of trainer.losses.STAGES


@dataclass
class TrainItem:
    """One example ready to batch: prompt+completion ids and what the loss needs about it."""

    example_id: str
    entry_id: str  # the stream entry id (Redis) or "path:line" (file)
    input_ids: list[int]
    n_prompt: int
    behavior: list[float] | None
    policy_version: int
    stage: str
    weight: float = 1.0  # staleness down-weighting multiplies this
    # The distribution `behavior` is under (the record's `sampling`); 1/1 for schema-1 records, which
    # carry none and were trained with temperature-1 ratios.
    temperature: float = 1.0
    top_p: float = 1.0

    @property
    def n_completion(self) -> int:
        """Completion tokens (the ones the loss is on)."""
        return len(self.input_ids) - self.n_prompt


def prepare_item(example: Example, tokenizer: Any, max_seq_len: int, entry_id: str) -> TrainItem:
    """Tokenize `example`'s prompt and append its completion ids; ValueError when it cannot be trained."""
    prompt_ids = render_prompt_ids(tokenizer, example.prompt)
    ids = prompt_ids + list(example.completion_token_ids)
    if len(ids) > max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) + completion ({len(example.completion_token_ids)}) tokens "
            f"exceed max_seq_len {max_seq_len}"
        )
    vocab = len(tokenizer)
    if any(t < 0 or t >= vocab for t in example.completion_token_ids):
        raise ValueError(f"completion_token_ids contain ids outside the tokenizer's vocabulary of {vocab}")
    sampling = example.sampling
    return TrainItem(
        example_id=example.id,
        entry_id=entry_id,
        input_ids=ids,
        n_prompt=len(prompt_ids),
        behavior=example.behavior_logprobs,
        policy_version=example.policy_version,
        stage=example.stage.value,
        temperature=1.0 if sampling is None else sampling.temperature,
        top_p=1.0 if sampling is None else sampling.top_p,
    )


@dataclass
class Batch:
    """A right-padded micro-batch; every `[B, L-1]` tensor is aligned with the *shifted* targets."""

    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L]
    targets: Tensor  # [B, L-1] input_ids[:, 1:]
    mask: Tensor  # [B, L-1] 1.0 where the target is a completion token
    behavior: Tensor  # [B, L-1] behaviour log-probs at completion positions, 0 elsewhere
    has_behavior: Tensor  # [B] bool
    example_weight: Tensor  # [B] staleness weight (0 for a padding item)
    temperature: Tensor  # [B] the sampling temperature behind `behavior` (1 without)
    top_p: Tensor  # [B] the sampling nucleus behind `behavior` (1 without)
    stage: Tensor  # [B] long: index into `trainer.losses.STAGES`

    def to(self, device: torch.device) -> Batch:
        """The same batch on `device`."""
        return Batch(*(t.to(device) for t in vars(self).values()))


def collate(items: Sequence[TrainItem], pad_id: int, zero_weight: bool = False) -> Batch:
    """Right-pad `items` into one batch; `zero_weight` makes a batch that runs forward but adds nothing."""
    length = max(len(it.input_ids) for it in items)
    n = len(items)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    mask = torch.zeros((n, length - 1))
    behavior = torch.zeros((n, length - 1))
    for i, it in enumerate(items):
        input_ids[i, : len(it.input_ids)] = torch.tensor(it.input_ids)
        attention[i, : len(it.input_ids)] = 1
        # Logits at position j predict token j+1: the first completion token is predicted at n_prompt-1.
        start, end = it.n_prompt - 1, len(it.input_ids) - 1
        mask[i, start:end] = 0.0 if zero_weight else 1.0
        if it.behavior is not None:
            behavior[i, start:end] = torch.tensor(it.behavior)
    weights = torch.tensor([0.0 if zero_weight else it.weight for it in items])
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        targets=input_ids[:, 1:].clone(),
        mask=mask,
        behavior=behavior,
        has_behavior=torch.tensor([it.behavior is not None for it in items]),
        example_weight=weights,
        temperature=torch.tensor([it.temperature for it in items]),
        top_p=torch.tensor([it.top_p for it in items]),
        stage=torch.tensor([_STAGE_INDEX[it.stage] for it in items], dtype=torch.long),
    )


Prepare = Callable[[Example, str], TrainItem]


class Source(Protocol):
    """Where rank 0 reads training items; `commit` is called once a checkpoint containing them is published."""

    def next_items(self, n: int) -> tuple[list[TrainItem], bool]:
        """Up to `n` items, and whether the source is exhausted (no more will come)."""
        ...

    def commit(self, entry_ids: Sequence[str]) -> None:
        """Acknowledge entries whose updates are in a published checkpoint."""
        ...

    def position(self) -> dict[str, Any]:
        """Resumable read position (saved in the training state)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def read_order(shuffle_seed: int | None) -> str:
    """How a file source orders its rows, as saved in its position: 'file', or 'shuffled:<seed>'."""
    return "file" if shuffle_seed is None else f"shuffled:{shuffle_seed}"


def check_resume_order(position: dict[str, Any], shuffle_seed: int | None) -> None:
    """ValueError unless a file source saved at `position` resumes in the order this run reads.

    The saved count of consumed rows indexes that epoch's order, so another order would skip rows never
    trained and repeat others. Positions saved before the trainer shuffled carry no order: file order.
    """
    if not position:
        return  # a fresh start
    saved, wanted = position.get("order", "file"), read_order(shuffle_seed)
    if saved != wanted:
        raise ValueError(
            f"the checkpoint read its file source in {saved} order and this run reads it in {wanted} order: "
            "resume with the same --seed and --shuffle/--no-shuffle, or start again with --no-resume"
        )


class FileSource:
    """Records from a JSONL/parquet file, `epochs` times; bad lines are logged with their number and skipped.

    With `shuffle_seed`, epoch e reads the rows in a permutation drawn from (seed, e) alone, so the saved
    position (epoch, rows consumed in it) names the same next row when a run resumes; the file's records
    are then held in memory. Without it the file is streamed in file order every epoch.
    """

    def __init__(
        self,
        path: Path,
        prepare: Prepare,
        epochs: int = 1,
        start: dict[str, Any] | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        self.path = path
        self.prepare = prepare
        self.epochs = epochs
        self.shuffle_seed = shuffle_seed
        check_resume_order(start or {}, shuffle_seed)  # also checked before the model loads (trainer.train)
        self.epoch = int((start or {}).get("epoch", 0))
        self.consumed = int((start or {}).get("consumed", 0))  # rows consumed in the current epoch
        self._records: list[tuple[int, Example | Exception]] | None = None  # the file, once read (shuffled)
        self._rows = self._iter()

    def _epoch_rows(self) -> Iterable[tuple[int, Example | Exception]]:
        if self.shuffle_seed is None:
            return read_examples(self.path)
        if self._records is None:
            self._records = list(read_examples(self.path))
        order = list(range(len(self._records)))
        # A string seed: stable across Python versions and processes (unlike hash()), and no two
        # (seed, epoch) pairs share a stream the way seed + epoch would.
        random.Random(f"{self.shuffle_seed}:{self.epoch}").shuffle(order)
        return (self._records[k] for k in order)

    def _iter(self) -> Iterator[TrainItem]:
        while self.epoch < self.epochs:
            for i, (line, rec) in enumerate(self._epoch_rows()):
                if i < self.consumed:
                    continue  # read in an earlier run before the checkpoint we resumed from
                self.consumed = i + 1
                where = f"{self.path}:{line}"
                if isinstance(rec, Exception):
                    log.warning("skipping %s: %s", where, _one_line(rec))
                    continue
                try:
                    yield self.prepare(rec, where)
                except ValueError as exc:
                    log.warning("skipping %s (id %s): %s", where, rec.id, exc)
            self.epoch += 1
            self.consumed = 0

    def next_items(self, n: int) -> tuple[list[TrainItem], bool]:
        """Up to `n` items; exhausted after the last epoch's last row."""
        items: list[TrainItem] = []
        for item in self._rows:
            items.append(item)
            if len(items) == n:
                return items, False
        return items, True

    def commit(self, entry_ids: Sequence[str]) -> None:
        """Files need no acknowledgement."""

    def position(self) -> dict[str, Any]:
        """Epoch, rows consumed in it, and the order they were read in."""
        return {"epoch": self.epoch, "consumed": self.consumed, "order": read_order(self.shuffle_seed)}

    def close(self) -> None:
        """Nothing to release."""


class RedisSource:
    """Consumer `consumer` of group `trainer` on the examples stream, acking only on `commit`."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        consumer: str,
        prepare: Prepare,
        idle_exit_s: float | None = None,
        already_trained: Collection[str] = (),
        block_ms: int = 1000,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.keys = keys
        self.consumer = consumer
        self.prepare = prepare
        self.idle_exit_s = idle_exit_s
        self.block_ms = block_ms
        self.should_stop = should_stop  # checked while waiting for entries, so a stop signal is not stuck here
        # Entries the resumed checkpoint already contains but whose ack did not happen before the crash.
        self.already_trained = set(already_trained)
        self._loop = asyncio.new_event_loop()
        self.redis = async_redis(url)  # its socket timeout (5 s) stays above `block_ms`
        self._replay_from: str | None = "0"  # None once this consumer's pending entries are replayed
        self._handed: set[str] = set()  # entries given to the loop and not yet committed
        self._last_seen = time.monotonic()
        self._run(self._ensure_group())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    async def _ensure_group(self) -> None:
        from shared.streams import ensure_group

        await retry_async(lambda: ensure_group(self.redis, self.keys.examples, TRAINER_GROUP), "trainer group")

    def next_items(self, n: int) -> tuple[list[TrainItem], bool]:
        """Up to `n` items: pending replays first, then new entries; exhausted only after `idle_exit_s`."""
        return self._run(self._next_items(n))

    async def _next_items(self, n: int) -> tuple[list[TrainItem], bool]:
        items: list[TrainItem] = []
        while len(items) < n:
            if self._replay_from is not None:
                entries = await self._read(self._replay_from, n - len(items), None)
                if not entries:
                    self._replay_from = None
                    continue
                self._replay_from = entries[-1][0]
            else:
                entries = await self._read(">", n - len(items), self.block_ms)
                if not entries:
                    if await self._stranded():
                        self._replay_from = "0"  # next time: entries a lost reply left pending (see module doc)
                    idle = time.monotonic() - self._last_seen
                    if self.should_stop() or (self.idle_exit_s is not None and idle > self.idle_exit_s):
                        return items, True
                    if items:
                        # Train what is here rather than stall while the producer is slow.
                        return items, False
                    continue
                self._last_seen = time.monotonic()
            for entry_id, fields in entries:
                item = await self._accept(entry_id, fields)
                if item is not None:
                    items.append(item)
        return items, False

    async def _stranded(self) -> bool:
        """Whether this consumer has pending entries the loop was never given (a read's reply was lost)."""
        # Ids only, and just enough of them: among len(handed) + 1 pending entries one must be stranded.
        pending: Any = await retry_async(
            lambda: self.redis.xpending_range(
                self.keys.examples, TRAINER_GROUP, "-", "+", len(self._handed) + 1, consumername=self.consumer
            ),
            "checking pending entries",
        )
        return any(_text(p["message_id"]) not in self._handed for p in pending)

    async def _read(self, start: str, count: int, block_ms: int | None) -> list[tuple[str, dict[Any, Any] | None]]:
        """XREADGROUP on the examples stream from `start` ('0…' replays this consumer's pending entries)."""
        resp: Any = await retry_async(
            lambda: self.redis.xreadgroup(
                TRAINER_GROUP, self.consumer, {self.keys.examples: start}, count=count, block=block_ms
            ),
            "reading the examples stream",
        )
        return [(_text(eid), fields) for eid, fields in (resp[0][1] if resp else [])]

    async def _accept(self, entry_id: str, fields: dict[Any, Any] | None) -> TrainItem | None:
        """The entry as an item, or None after acking it (already trained) or dead-lettering it (bad)."""
        from shared.streams import dead_letter, field

        if entry_id in self._handed:
            return None  # replayed from the pending list, already in the loop's hands
        if entry_id in self.already_trained:
            await self._ack([entry_id])
            return None
        data = field(fields or {}, "data")
        reason: str
        if data is None:
            reason = "entry has no 'data' field (or was deleted from the stream)"
        else:
            try:
                item = self.prepare(Example.model_validate_json(data), entry_id)
                self._handed.add(entry_id)
                return item
            except ValidationError as exc:
                reason = f"invalid example record: {_one_line(exc)}"
            except ValueError as exc:
                reason = str(exc)
        log.warning("dead-lettering entry %s: %s", entry_id, reason)
        await retry_async(
            lambda: dead_letter(self.redis, self.keys, "trainer", entry_id, data or {}, reason), "dead-lettering"
        )
        # Parked with its reason in the dead-letter stream, so it must not be redelivered forever.
        await self._ack([entry_id])
        return None

    def commit(self, entry_ids: Sequence[str]) -> None:
        """XACK `entry_ids` (their updates are in a published checkpoint)."""
        if entry_ids:
            self._run(self._ack(entry_ids))

    async def _ack(self, entry_ids: Sequence[str]) -> None:
        await retry_async(lambda: self.redis.xack(self.keys.examples, TRAINER_GROUP, *entry_ids), "acknowledging")
        self._handed.difference_update(entry_ids)

    def position(self) -> dict[str, Any]:
        """The group keeps the position; the consumer name is what a restart must reuse."""
        return {"consumer": self.consumer}

    def close(self) -> None:
        """Close the connection and the private event loop."""
        self._run(self.redis.aclose())
        self._loop.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _one_line(exc: Exception) -> str:
    """A short one-line reason: a validation error's fields and messages, else the message."""
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in errors[:3]]
        more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
        return "; ".join(parts) + more
    return " ".join(str(exc).split())
