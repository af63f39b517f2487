"""Trainer data path and config: tokenization, alignment of the shifted tensors, bad lines, staleness, schedule."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.keys import Keys
from shared.prompts import render_prompt_ids
from shared.schema import Example, Sampling
from tests.support.trainer import make_examples, write_jsonl
from trainer.config import TrainerConfig
from trainer.data import FileSource, RedisSource, TrainItem, check_resume_order, collate, prepare_item
from trainer.train import apply_staleness
from trainer.zero import lr_lambda


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_prepare_item_is_rendered_prompt_plus_record_tokens(tokenizer, tiny_model_dir: Path):
    ex = make_examples(tiny_model_dir, 1)[0]
    item = prepare_item(ex, tokenizer, 512, "e1")
    prompt = render_prompt_ids(tokenizer, ex.prompt)
    assert item.input_ids == prompt + ex.completion_token_ids
    assert item.n_prompt == len(prompt)
    assert item.input_ids[-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="exceed max_seq_len 8"):
        prepare_item(ex, tokenizer, 8, "e1")
    bad = ex.model_copy(update={"completion_token_ids": [len(tokenizer) + 5] * len(ex.completion_token_ids)})
    with pytest.raises(ValueError, match="vocabulary"):
        prepare_item(bad, tokenizer, 512, "e1")


def test_collate_aligns_mask_and_behaviour_with_shifted_targets():
    a = TrainItem("a", "1", [10, 11, 12, 13, 14], n_prompt=3, behavior=[-0.5, -0.25], policy_version=0, stage="self")
    b = TrainItem("b", "2", [20, 21, 22], n_prompt=2, behavior=None, policy_version=0, stage="expert", weight=0.5)
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch.targets.tolist() == [[11, 12, 13, 14], [21, 22, 0, 0]]
    # Targets 13, 14 (a's completion) and 22 (b's) are the only trained positions; EOS is the last one.
    assert batch.mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert batch.behavior.tolist() == [[0, 0, -0.5, -0.25], [0, 0, 0, 0]]
    assert batch.has_behavior.tolist() == [True, False]
    assert batch.example_weight.tolist() == [1.0, 0.5]
    stand_in = collate([a], pad_id=0, zero_weight=True)
    assert stand_in.mask.sum().item() == 0 and stand_in.example_weight.tolist() == [0.0]


def test_file_source_skips_bad_lines_with_their_number(tmp_path: Path, tokenizer, tiny_model_dir: Path, caplog):
    path = write_jsonl(tmp_path / "ex.jsonl", make_examples(tiny_model_dir, 3))
    lines = path.read_text().splitlines()
    lines.insert(1, '{"id": "broken"}')
    path.write_text("\n".join(lines) + "\n")
    source = FileSource(path, lambda ex, where: prepare_item(ex, tokenizer, 512, where), epochs=2)
    with caplog.at_level(logging.WARNING, logger="mindgap.trainer.data"):
        first, done = source.next_items(4)
        rest, done2 = source.next_items(4)
    assert [it.example_id for it in first] == ["ex-0", "ex-1", "ex-2", "ex-0"]
    assert not done and done2 and [it.example_id for it in rest] == ["ex-1", "ex-2"]
    assert f"{path}:2" in caplog.text and "problem_id" in caplog.text
    # A resumed source starts after the rows the checkpoint had consumed.
    resumed = FileSource(
        path, lambda ex, where: prepare_item(ex, tokenizer, 512, where), 2, start={"epoch": 1, "consumed": 2}
    )
    assert [it.example_id for it in resumed.next_items(10)[0]] == ["ex-1", "ex-2"]


def test_shuffled_file_source_draws_each_epoch_from_seed_and_epoch_and_resumes_exactly(
    tmp_path: Path, tokenizer, tiny_model_dir: Path, caplog
):
    path = write_jsonl(tmp_path / "ex.jsonl", make_examples(tiny_model_dir, 8))
    lines = path.read_text().splitlines()
    lines.insert(3, "not json")
    path.write_text("\n".join(lines) + "\n")

    def source(seed: int | None, start: dict[str, Any] | None = None) -> FileSource:
        return FileSource(path, lambda ex, where: prepare_item(ex, tokenizer, 512, where), 2, start, seed)

    def ids(items: list[TrainItem]) -> list[str]:
        return [it.example_id for it in items]

    with caplog.at_level(logging.WARNING, logger="mindgap.trainer.data"):
        whole, done = source(3).next_items(100)
    assert done and f"{path}:4" in caplog.text  # a bad line keeps its file line number in a shuffled epoch
    first, second = ids(whole[:8]), ids(whole[8:])
    file_order = [f"ex-{i}" for i in range(8)]
    assert sorted(first) == sorted(second) == file_order  # each epoch: every record once
    assert len({tuple(first), tuple(second), tuple(file_order)}) == 3  # a fresh order per epoch
    assert ids(source(3).next_items(100)[0]) == first + second  # a function of the seed alone
    assert ids(source(4).next_items(100)[0])[:8] != first
    assert ids(source(None).next_items(100)[0]) == file_order * 2
    # Interrupted after 5 and after 11 items (mid-epoch in each): the resumed source reads exactly the rest.
    for cut in (5, 11):
        reader = source(3)
        head, _ = reader.next_items(cut)
        position = reader.position()
        assert position["order"] == "shuffled:3"
        tail, done = source(3, position).next_items(100)
        assert ids(head) + ids(tail) == first + second and done


def test_resume_order_must_match_the_checkpoints():
    check_resume_order({"epoch": 1, "consumed": 4, "order": "shuffled:2"}, 2)
    check_resume_order({"epoch": 1, "consumed": 4}, None)  # saved before shuffling: file order
    check_resume_order({}, 7)  # nothing to resume
    with pytest.raises(ValueError, match="in file order and this run reads it in shuffled:0 order"):
        check_resume_order({"epoch": 0, "consumed": 4}, 0)
    with pytest.raises(ValueError, match="shuffled:2 order and this run reads it in shuffled:5 order"):
        check_resume_order({"order": "shuffled:2"}, 5)


def _item(version: int) -> TrainItem:
    return TrainItem(f"v{version}", "1", [1, 2], 1, None, version, "self")


def test_staleness_drop_and_downweight(tmp_path: Path):
    items = [_item(5), _item(4), _item(2)]
    kept, dropped = apply_staleness(items, 5, TrainerConfig(max_staleness=1, staleness_mode="drop"))
    assert [it.example_id for it in kept] == ["v5", "v4"] and dropped == 1
    cfg = TrainerConfig(max_staleness=1, staleness_mode="downweight", staleness_decay=0.5)
    kept, dropped = apply_staleness([_item(5), _item(4), _item(2)], 5, cfg)
    assert [it.weight for it in kept] == [1.0, 1.0, 0.25] and dropped == 0


def test_batch_shape_from_config():
    assert TrainerConfig(batch_size=8, micro_batch_size=2).grad_accum_for(2) == 2
    assert TrainerConfig(grad_accum=3, micro_batch_size=2).global_batch(2) == 12
    with pytest.raises(ValueError, match="contradicts"):
        TrainerConfig(batch_size=8, grad_accum=3).grad_accum_for(1)
    with pytest.raises(ValueError, match="not divisible"):
        TrainerConfig(batch_size=6, micro_batch_size=2).grad_accum_for(2)
    with pytest.raises(ValueError, match="source"):
        TrainerConfig(source="/no/such/file.jsonl")


def test_warmup_then_cosine_to_floor():
    assert lr_lambda(0, 4, 20, 0.1) == pytest.approx(0.2)
    assert lr_lambda(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_lambda(12, 4, 20, 0.1) == pytest.approx(0.55)
    assert lr_lambda(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_lambda(50, 4, 20, 0.1) == pytest.approx(0.1)


def _v1_record(ex: Example) -> dict[str, Any]:
    """`ex` as a schema_version 1 writer stored it: no `sampling`, `target_logprobs` always present."""
    row = json.loads(ex.model_dump_json(exclude={"sampling"}))
    return row | {"schema_version": 1, "target_logprobs": [-1.0] * len(ex.completion_token_ids)}


def test_items_carry_the_sampling_distribution_and_v1_records_train_at_temperature_one(
    tmp_path: Path, tokenizer, tiny_model_dir: Path
) -> None:
    ex = make_examples(tiny_model_dir, 1)[0].model_copy(update={"sampling": Sampling(temperature=0.7, top_p=0.9)})
    item = prepare_item(ex, tokenizer, 512, "e1")
    assert (item.temperature, item.top_p, item.stage) == (0.7, 0.9, "self")
    batch = collate([item, TrainItem("b", "2", [1, 2], 1, None, 0, "expert")], pad_id=0)
    assert batch.temperature.tolist() == pytest.approx([0.7, 1.0]) and batch.top_p.tolist() == pytest.approx([0.9, 1])
    assert batch.stage.tolist() == [0, 2]  # indices into trainer.losses.STAGES
    # a version 1 file: read, and its behaviour log-probs taken as temperature-1 ones
    path = tmp_path / "v1.jsonl"
    path.write_text(json.dumps(_v1_record(ex)) + "\n")
    (old,), _ = FileSource(path, lambda e, where: prepare_item(e, tokenizer, 512, where)).next_items(5)
    assert (old.temperature, old.top_p, old.behavior) == (1.0, 1.0, ex.behavior_logprobs)


def test_version_1_entries_still_read_from_the_stream(tokenizer, tiny_model_dir: Path, redis_url: str) -> None:
    keys = Keys(f"v1-{os.getpid()}")
    r = redis.Redis.from_url(redis_url)
    ex = make_examples(tiny_model_dir, 1)[0]
    r.xadd(keys.examples, {"id": ex.id, "data": json.dumps(_v1_record(ex))})
    source = RedisSource(
        redis_url, keys, "c0", lambda e, eid: prepare_item(e, tokenizer, 512, eid), idle_exit_s=0.2, block_ms=100
    )
    try:
        items, _ = source.next_items(2)
    finally:
        source.close()
    assert [it.example_id for it in items] == [ex.id] and items[0].temperature == 1.0
    assert r.xlen(keys.deadletter) == 0
