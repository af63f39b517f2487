"""`mindgap gap`: statistics against hand-computed numbers, scoring on the fake engine, the CLI outputs."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mindgap.cli import _register, app
from mindgap.evaluation.gap import (
    Scored,
    dataset_report,
    detect_kind,
    load_raw,
    load_records,
    needs_sampled,
    sampled_logprobs,
    score_problems,
    score_records,
    summarise,
)
from services.fake_engine import FakeEngine
from services.pipeline import rewrite_batch
from shared.config import StageParams
from shared.dataio import DataError, atomic_write_jsonl
from shared.grading import Grader
from shared.prompts import render_prompt_ids, solve_messages
from shared.schema import ChatMessage, Example, Problem, Sampling, Stage
from tests.support.sampling import draw

PROBLEMS = [
    Problem(id="a", question="What is 1+1?", answer="2", solution="1 + 1 = 2\n#### 2"),  # self
    Problem(id="b", question="What is 1+2?", answer="3", solution="1 + 2 = 3\n#### 3"),  # guided
    Problem(id="c", question="Describe a circle.", solution="A circle is round."),  # expert (ungradable)
]


def invoke(*args: str | Path):
    _register()
    name = ["gap"] if isinstance(typer.main.get_command(app), typer.core.TyperGroup) else []
    return CliRunner().invoke(app, [*name, *map(str, args)])


@pytest.fixture
def raw_file(tmp_path: Path) -> Path:
    path = tmp_path / "raw.jsonl"
    atomic_write_jsonl(path, [{"id": p.id, "question": p.question, "solution": p.solution} for p in PROBLEMS])
    return path


@pytest.fixture
async def records_file(tmp_path: Path) -> Path:
    with Grader(workers=1, timeout=10) as grader:
        outcomes = await rewrite_batch(PROBLEMS, FakeEngine(), grader, StageParams(k=2, resolve_attempts=2, score=True))
    path = tmp_path / "rewritten.jsonl"
    atomic_write_jsonl(path, [ex for o in outcomes for ex in o.examples])
    return path


def test_summarise_by_hand() -> None:
    seqs = [
        # sampled at temperature 1: the ratio's policy side is the target itself
        Scored("self", [math.log(0.5), math.log(0.5)], [math.log(0.25), math.log(0.5)], [math.log(0.5)] * 2),
        Scored("expert", [math.log(0.1)]),
    ]
    s = summarise(seqs)
    assert s["tokens"]["tokens"] == 3
    assert s["tokens"]["mean_nll"] == pytest.approx((2 * math.log(2) + math.log(10)) / 3)
    assert s["tokens"]["share_below_p"] == 0.0  # p = 0.1 exactly is not below 0.1
    det = s["deterministic_behavior"]
    # sequence weights w = (0.25, 0.1): ESS = 0.35² / (2 · (0.0625 + 0.01))
    assert det["sequence"]["ess"] == pytest.approx(0.35**2 / (2 * 0.0725))
    # per-token geometric means (0.5, 0.1): ESS = 0.6² / (2 · 0.26)
    assert det["per_token_mean"]["ess"] == pytest.approx(0.36 / 0.52)
    assert det["sequence"]["min"] == pytest.approx(math.log(0.1))
    ratio = s["behavior_ratio"]  # only the self response has behaviour log-probs: log w = ln 2
    assert ratio["sequence"]["sequences"] == 1 and ratio["sequence"]["mean"] == pytest.approx(math.log(2))
    assert ratio["per_token_mean"]["mean"] == pytest.approx(math.log(2) / 2)
    assert summarise([Scored("expert", [-1.0])])["behavior_ratio"] is None


def test_dataset_report_splits_by_stage_in_pipeline_order() -> None:
    seqs = [
        Scored("expert", [-1.0]),
        Scored("self", [-0.5, -0.2], [-0.4, -0.3], [-0.5, -0.2]),
        Scored("guided", [-2.0], [-1.0], [-2.0]),
    ]
    rep = dataset_report("d", Path("d.jsonl"), "records", seqs)
    assert list(rep["by_stage"]) == ["self", "guided", "expert"]
    assert rep["stage_counts"] == {"self": 1, "guided": 1, "expert": 1}
    assert rep["by_stage"]["guided"]["behavior_ratio"]["sequence"]["mean"] == pytest.approx(-1.0)
    assert rep["all"]["behavior_ratio"]["sequence"]["sequences"] == 2


async def test_score_problems_scores_expert_solution_on_training_prompt(raw_file: Path) -> None:
    engine = FakeEngine()
    problems = load_raw(raw_file, None)
    seqs = await score_problems(engine, problems)
    prompt = engine.render_prompt(solve_messages(PROBLEMS[0].question))
    completion = engine.encode_completion(PROBLEMS[0].solution or "")
    assert seqs[0].target == [engine.token_logprob(prompt, t, i) for i, t in enumerate(completion)]
    assert all(s.stage == "expert" and s.behavior is None for s in seqs)


async def test_score_records_rescore_or_reuse(records_file: Path, tmp_path: Path) -> None:
    examples = load_records(records_file)
    assert {e.stage for e in examples} == {Stage.SELF, Stage.GUIDED, Stage.EXPERT}
    engine = FakeEngine()
    rescored = await score_records(engine, examples)
    assert [s.target for s in rescored] == [e.target_logprobs for e in examples]  # same weights, same numbers
    await engine.reload(str(tmp_path))  # new weights: rescoring changes the numbers, reuse does not
    changed = await score_records(engine, examples)
    assert [s.target for s in changed] != [e.target_logprobs for e in examples]
    reused = await score_records(None, examples, rescore=False)
    assert [s.target for s in reused] == [e.target_logprobs for e in examples]
    assert [s.behavior for s in reused] == [e.behavior_logprobs for e in examples]
    with pytest.raises(ValueError, match="engine"):
        await score_records(None, examples, rescore=True)


def test_detect_kind(raw_file: Path, records_file: Path) -> None:
    assert detect_kind(raw_file) == "problems"
    assert detect_kind(records_file) == "records"


def test_gap_cli_two_datasets_side_by_side(
    raw_file: Path, records_file: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "gap"
    # the fake engine scores; --model is what computes the ratios at the records' temperature 0.7
    labels = ("--labels", "raw", "--labels", "rewritten")
    result = invoke(raw_file, records_file, *labels, "-o", out, "--backend", "fake", "--model", tiny_model_dir)
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "gap.json").read_text())
    raw, rewritten = rep["datasets"]
    assert (raw["name"], raw["kind"], raw["stage_counts"]) == ("raw", "problems", {"expert": 3})
    assert rewritten["kind"] == "records" and rewritten["stage_counts"] == {"self": 1, "guided": 1, "expert": 1}
    assert raw["all"]["behavior_ratio"] is None and rewritten["all"]["behavior_ratio"] is not None
    assert rewritten["all"]["behavior_ratio"]["sequence"]["sequences"] == 2
    assert rewritten["all"]["ratio_unavailable"] == 0
    assert rep["rescored"] is True and "deterministic_behavior" in rep["definitions"]
    md = (out / "gap.md").read_text()
    assert "| raw | expert | 3 |" in md and "| rewritten | all | 3 |" in md and "| rewritten | guided | 1 |" in md
    assert (out / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gap_cli_reuses_stored_logprobs_without_an_engine(records_file: Path, tmp_path: Path) -> None:
    # No --backend fake: with --no-rescore and records only, no engine may be started at all.
    result = invoke(records_file, "--no-rescore", "-o", tmp_path / "g")
    assert result.exit_code == 0, result.output
    rep = json.loads((tmp_path / "g" / "gap.json").read_text())
    assert rep["rescored"] is False and rep["datasets"][0]["name"] == "rewritten"
    # stored log-probs are at temperature 1: the ratios at the sampling temperature need the model
    assert rep["datasets"][0]["all"]["behavior_ratio"] is None
    assert rep["datasets"][0]["all"]["ratio_unavailable"] == 2


def test_records_without_target_logprobs_are_rescored(tmp_path: Path) -> None:
    async def rewrite() -> list[Example]:
        with Grader(workers=1, timeout=10) as grader:
            outcomes = await rewrite_batch(PROBLEMS, FakeEngine(), grader, StageParams(k=2, resolve_attempts=2))
        return [ex for o in outcomes for ex in o.examples]

    examples = asyncio.run(rewrite())
    assert all(ex.target_logprobs is None for ex in examples)  # scoring is off by default
    rescored = asyncio.run(score_records(FakeEngine(), examples))
    assert [len(s.target) for s in rescored] == [len(ex.completion_token_ids) for ex in examples]
    with pytest.raises(DataError, match=r"3 records have no target_logprobs .*\(drop --no-rescore\)"):
        asyncio.run(score_records(None, examples, rescore=False))
    path = tmp_path / "unscored.jsonl"
    atomic_write_jsonl(path, examples)
    result = invoke(path, "--no-rescore", "-o", tmp_path / "g")
    assert result.exit_code == 2 and "drop --no-rescore" in result.output and "Traceback" not in result.output


def test_behaviour_ratio_of_the_models_own_samples_is_one(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompt = solve_messages("What is two plus three?")
    completions, behaviour = draw(model, render_prompt_ids(tokenizer, prompt), 0.7, 0.9, n=8, length=12)
    examples = [
        Example(
            id=f"s{i}",
            problem_id="p",
            prompt=prompt,
            completion=[ChatMessage(role="assistant", content=tokenizer.decode(c))],
            completion_token_ids=c,
            stage=Stage.SELF,
            policy_version=0,
            sampling=Sampling(temperature=0.7, top_p=0.9),
            behavior_logprobs=b,
            answer="5",
            grade="correct",
        )
        for i, (c, b) in enumerate(zip(completions, behaviour, strict=True))
    ]
    assert all(needs_sampled(ex) for ex in examples)
    sampled = sampled_logprobs(str(tiny_model_dir), examples)
    seqs = [Scored("self", s, ex.behavior_logprobs, s) for s, ex in zip(sampled, examples, strict=True)]
    ratio = summarise(seqs)["behavior_ratio"]["sequence"]
    assert abs(ratio["mean"]) < 1e-3 and ratio["ess"] > 0.99  # log weights ≈ 0: weights ≈ 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("{raw}", "{raw}", "{raw}"), "inputs"),
        (("{raw}", "--labels", "a", "--labels", "b"), "2 labels for 1 inputs"),
        (("/no/such.jsonl",), "input file not found"),
        (("{raw}", "--fields", "question=nope"), "unknown field 'nope'"),
    ],
)
def test_gap_cli_errors(extra: tuple[str, ...], message: str, raw_file: Path, tmp_path: Path) -> None:
    args = [a.replace("{raw}", str(raw_file)) for a in extra]
    result = invoke(*args, "-o", tmp_path / "g", "--backend", "fake")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_gap_cli_reads_a_split_of_an_hf_datasets_folder(tmp_path: Path) -> None:
    import datasets

    rows = [{"id": p.id, "question": p.question, "solution": p.solution} for p in PROBLEMS]
    folder = tmp_path / "raw_hf"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(folder))
    out = tmp_path / "gap"
    result = invoke(folder, "--split", "test", "-o", out, "--backend", "fake")
    assert result.exit_code == 0, result.output
    (raw,) = json.loads((out / "gap.json").read_text())["datasets"]
    assert raw["kind"] == "problems" and raw["stage_counts"] == {"expert": len(PROBLEMS)}
