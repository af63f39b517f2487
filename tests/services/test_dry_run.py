"""`POST /v1/jobs?dry_run=true` answers how rows read (the `mindgap inspect` preview) and queues nothing; the
job and sync-rewrite endpoints read chat and other public layouts through the same reader."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from services.settings import ServiceConfig
from shared.wire import DataPreview
from tests.support.service import FAST_PARAMS, running_service

pytestmark = pytest.mark.redis

ConfigFactory = Callable[..., ServiceConfig]
LAYOUTS = Path(__file__).resolve().parents[1] / "shared" / "data" / "layouts"

CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "2 + 3 = 5. The answer is: 5"},
        ]
    },
    {"messages": [{"role": "user", "content": "What is 4+4?"}, {"role": "assistant", "content": "\\boxed{8}"}]},
    {"prompt": [{"role": "assistant", "content": "no user here"}]},
]


async def test_dry_run_of_inline_rows_previews_and_queues_nothing(service_config: ConfigFactory) -> None:
    async with running_service(service_config()) as (client, _):
        resp = await client.post("/v1/jobs", params={"dry_run": "true"}, json={"rows": CHAT_ROWS})
        assert resp.status_code == 200, resp.text
        report = DataPreview.model_validate(resp.json())
        assert (report.rows, report.readable, report.ungradable, report.skipped) == (3, 2, 0, 1)
        assert report.mapping["question"] == {"'messages' user turn": 2}
        assert report.mapping["gold"] == {
            "'messages' assistant turn answer phrase": 1,
            "'messages' assistant turn \\boxed{}": 1,
        }
        first = report.problems[0]
        assert (first.question, first.answer, first.meta) == ("What is 2+3?", "5", {"system": "Be brief."})
        assert report.skipped_reasons == {"no user turn": 1}
        assert (report.errors[0].line, report.errors[0].message) == (
            3,
            "'prompt' is a list of chat messages with no user turn (assistant)",
        )
        assert (await client.get("/v1/jobs")).json()["jobs"] == []
        # the same body without dry_run creates the job
        created = await client.post("/v1/jobs", json={"rows": CHAT_ROWS, "params": FAST_PARAMS})
        assert created.status_code == 201 and created.json()["problems"] == 2


async def test_dry_run_of_an_upload_and_a_path_with_a_template(service_config: ConfigFactory, tmp_path: Path) -> None:
    (tmp_path / "svamp.jsonl").write_bytes((LAYOUTS / "svamp.jsonl").read_bytes())
    async with running_service(service_config(allowed_root=tmp_path)) as (client, _):
        svamp = (LAYOUTS / "svamp.jsonl").read_bytes()
        resp = await client.post("/v1/jobs?dry_run=true", files={"file": ("svamp.jsonl", svamp)})
        assert resp.status_code == 200, resp.text
        report = DataPreview.model_validate(resp.json())
        assert report.mapping["question"] == {"'Body' + 'Question'": 2}
        assert [p.answer for p in report.problems] == ["51", "1"]

        body = {"path": "svamp.jsonl", "fields": {"question": "{Question} ({Type})", "id": "ID"}}
        resp = await client.post("/v1/jobs?dry_run=true", json=body)
        assert resp.status_code == 200, resp.text
        report = DataPreview.model_validate(resp.json())
        assert report.fields == body["fields"]
        assert [p.id for p in report.problems] == ["chal-1", "chal-2"]
        assert report.problems[0].question == "How much do you have to pay to buy each pack? (Subtraction)"


async def test_dry_run_of_an_unreadable_layout_is_a_422_naming_the_fix(service_config: ConfigFactory) -> None:
    rows = [{"Problem_Text": "What is 3*3?", "Sol": "9"}]
    async with running_service(service_config()) as (client, _):
        resp = await client.post("/v1/jobs?dry_run=true", json={"rows": rows})
        assert resp.status_code == 422, resp.text
        message = resp.json()["detail"][0]["msg"]
        assert "Map one: --fields question=Problem_Text" in message and "line 1: row has no question" in message


async def test_sync_rewrite_reads_trl_conversational_rows(service_config: ConfigFactory) -> None:
    rows = [json.loads(line) for line in (LAYOUTS / "trl_conversational.jsonl").read_text().splitlines()]
    async with running_service(service_config()) as (client, _):
        resp = await client.post("/v1/rewrite", json={"rows": rows, "params": FAST_PARAMS})
        assert resp.status_code == 200, resp.text
        examples = resp.json()["examples"]
        assert {e["answer"] for e in examples} == {"12", "150"}
        prompts = [e["prompt"][-1]["content"] for e in examples]
        assert any("A rectangle is 3 cm wide" in p for p in prompts)
        assert not any("'role'" in p or '"role"' in p for p in prompts)  # never a JSON dump of the chat list
