"""The Guided Re-solving pipeline on the fake engine: every branch, batching, ids and the summary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
from rich.console import Console

from services.engine import SampleStream, SamplingConfig
from services.fake_engine import EOS_ID, FakeEngine, Script, scripted
from services.pipeline import ProblemOutcome, Summary, rewrite_batch, round_sizes
from shared.config import StageParams
from shared.grading import Grader
from shared.prompts import solve_messages
from shared.schema import Problem, Stage

QUESTION = "What is 2 plus 3?"
SOLUTION = "Two and three make 2 + 3 = 5.\n#### 5"


@pytest.fixture(scope="module")
def grader() -> Iterator[Grader]:
    with Grader(workers=1, timeout=10.0) as g:
        yield g


def problem(pid: str = "p1", question: str = QUESTION, solution: str | None = SOLUTION, answer: str | None = "5"):
    return Problem(id=pid, question=question, solution=solution, answer=answer)


def params(**kw) -> StageParams:
    # scoring on: most tests here check target_logprobs (test_scoring_only_when_asked covers it off)
    base = {"k": 4, "resolve_attempts": 2, "keep": 1, "rounds": 1, "temperature": 0.7, "max_tokens": 200, "score": True}
    return StageParams(**(base | kw))


async def run(engine: FakeEngine, grader: Grader, problems: Sequence[Problem], **kw) -> list[ProblemOutcome]:
    return await rewrite_batch(problems, engine, grader, params(**kw))


def generate_calls(engine: FakeEngine, needle: str) -> list[int]:
    """The `n` of every generate call whose prompt contains `needle`."""
    return [c.n for c in engine.calls if c.kind == "generate" and needle in c.prompt]


async def test_solved_in_stage_one(grader: Grader) -> None:
    engine = FakeEngine(scripted({QUESTION: ["2 + 3 = 5, so \\boxed{5}."]}))
    (out,) = await run(engine, grader, [problem()])
    assert out.stage is Stage.SELF and out.self_correct >= 1 and out.guided_attempts == 0
    (ex,) = out.examples
    assert ex.stage is Stage.SELF and ex.grade == "correct" and ex.answer == "5"
    assert ex.prompt == solve_messages(QUESTION)
    assert ex.response == "2 + 3 = 5, so \\boxed{5}."
    assert ex.completion_token_ids == engine.encode_completion(ex.response)
    assert ex.completion_token_ids[-1] == EOS_ID
    plain = engine.render_prompt(solve_messages(QUESTION))
    assert ex.target_logprobs == pytest.approx(await engine.score(plain, ex.completion_token_ids), abs=1e-7)
    # behaviour = processed log-probs of the sampling distribution on the plain prompt (fake: target / T)
    assert ex.behavior_logprobs == pytest.approx([t / 0.7 for t in ex.target_logprobs])
    assert ex.meta["finish_reason"] == "stop" and ex.meta["guidance"] is None
    assert ex.meta["predicted"] == "5"


async def test_keep_honoured_and_identical_texts_deduplicated(grader: Grader) -> None:
    responses = ["One: \\boxed{5}", "One: \\boxed{5}", "Two: \\boxed{5}", "Three: \\boxed{5}"]
    engine = FakeEngine(scripted({QUESTION: responses}))
    (out,) = await run(engine, grader, [problem()], k=4, keep=2)
    assert [e.response for e in out.examples] == ["One: \\boxed{5}", "Two: \\boxed{5}"]
    assert len({e.id for e in out.examples}) == 2
    # the second keeper ends the round: the longest sample is aborted where it stood, ungraded
    assert out.self_correct == 3 and out.self_attempts == 3 and out.aborted == 1
    assert out.generated_tokens == 4 * len(engine.encode_completion(responses[0]))


async def test_early_stop_skips_later_rounds_for_solved_problems(grader: Grader) -> None:
    easy, hard = "What is 1 plus 1?", "What is 4 plus 4?"
    engine = FakeEngine(scripted({easy: ["\\boxed{2}"], hard: ["\\boxed{0}", "\\boxed{1}"]}))
    problems = [problem("easy", easy, "1 + 1 = 2", "2"), problem("hard", hard, "4 + 4 = 8", "8")]
    easy_out, hard_out = await run(engine, grader, problems, k=4, rounds=2, resolve_attempts=0)
    assert generate_calls(engine, easy) == [2]  # solved in round 1: no round 2
    assert generate_calls(engine, hard) == [2, 2]
    assert easy_out.self_attempts == 1 and easy_out.aborted == 1  # its first sample was a keeper
    assert hard_out.self_attempts == 4 and hard_out.aborted == 0
    assert hard_out.stage is Stage.EXPERT


async def test_solved_in_stage_two_with_guidance_kept_out_of_the_prompt(grader: Grader) -> None:
    engine = FakeEngine(
        scripted({"Reference solution": ["Adding two and three gives 2 + 3 = \\boxed{5}."], QUESTION: ["\\boxed{6}"]})
    )
    (out,) = await run(engine, grader, [problem()], k=2, resolve_attempts=2)
    assert out.stage is Stage.GUIDED and out.self_correct == 0 and out.guided_correct == 1 and out.aborted == 1
    (ex,) = out.examples
    assert ex.grade == "correct" and ex.meta["guidance"] == "solution" and ex.meta["guided_attempts"] == 1
    assert ex.prompt == solve_messages(QUESTION)
    assert "Reference" not in ex.prompt[0].content
    # behaviour was sampled on the guided prompt, target is scored on the plain one: they differ.
    assert len(ex.behavior_logprobs or []) == len(ex.target_logprobs) == len(ex.completion_token_ids)
    assert ex.behavior_logprobs != pytest.approx([t / 0.7 for t in ex.target_logprobs])


async def test_guided_answer_mode_and_missing_solution_fall_back_to_answer(grader: Grader) -> None:
    engine = FakeEngine(scripted({"correct final answer is": ["I get 2 + 3 = \\boxed{5}."], QUESTION: ["\\boxed{6}"]}))
    (out,) = await run(engine, grader, [problem(solution=None)], guidance="solution")
    assert out.stage is Stage.GUIDED and out.guidance == "answer"


class LeaningEngine(FakeEngine):
    """A fake under which the responses in `leaning` are far likelier after the guided prompt than the plain."""

    def __init__(self, script: Script, leaning: Sequence[str], gain: float = 2.0) -> None:
        super().__init__(script)
        self.leaning = set(leaning)
        self.gain = gain

    async def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        scores = await super().score(prompt_ids, completion_ids)
        if self.decode(completion_ids) in self.leaning and "Reference solution" in self.decode(prompt_ids):
            return [min(0.0, s + self.gain) for s in scores]
        return scores


# Longer than every leaning response: the fake finishes (and the pipeline grades) shorter samples first.
CLEAN = (
    "Two plus three: start at 2 and count up by 3 more steps, one at a time, which gives 3, then 4, then 5,"
    " so 2 + 3 = 5. The sum is \\boxed{5}."
)
LEANING = {
    "echo": "Here is my own complete solution to the problem: 2 + 3 = 5, so \\boxed{5}.",
    "copy": "Two and three make 2 + 3 = 5, so \\boxed{5}.",  # with the solution below
    "answer_first": "5. To check it, 2 + 3 = 5, so \\boxed{5}.",
    "arithmetic": "Two plus three: 2 + 2 = 5, so \\boxed{5}.",
    "unworked": "Two plus three? The sum is \\boxed{5}.",
    "addresses": "Your solution is right: 2 + 3 = 5, so \\boxed{5}.",
    "other_answer": "The answer is 6. No: 2 + 3 = 5, so \\boxed{5}.",
    "likelihood": "Two plus three gives 2 + 3 = 5, which is \\boxed{5}.",
}
LONG_SOLUTION = "Two and three make five because counting on from two by three more steps lands on five.\n#### 5"


@pytest.mark.parametrize("reason", list(LEANING))
async def test_guidance_filter_rejects_each_kind_of_leaning(grader: Grader, reason: str) -> None:
    leaning = LEANING[reason]
    if reason == "copy":
        leaning = "Two and three make five because counting on from two by three more steps lands on \\boxed{5}."
    script = scripted({"Reference solution": [leaning, CLEAN], QUESTION: ["\\boxed{6}"]})
    engine = LeaningEngine(script, [leaning])
    (out,) = await run(engine, grader, [problem(solution=LONG_SOLUTION)], resolve_attempts=2)
    assert out.guided_correct == 2 and out.guidance_rejected == {r: int(r == reason) for r in LEANING}
    (ex,) = out.examples
    assert ex.response == CLEAN and ex.stage is Stage.GUIDED
    assert ex.meta["guidance_rejected"] == out.guidance_rejected
    check = ex.meta["guidance_check"]
    assert check["reason"] is None and check["answer_first"] is False and check["logprob_gain"] < 0.5
    # the plain-prompt scores the check took are the record's target (no third scoring pass)
    plain = engine.render_prompt(solve_messages(QUESTION))
    assert ex.target_logprobs == pytest.approx(await engine.score(plain, ex.completion_token_ids), abs=1e-7)
    summary = Summary.from_outcomes([out])
    assert summary.guidance_rejected[reason] == 1 and summary.to_dict()["guidance_rejected"][reason] == 1


@pytest.mark.parametrize("reason", list(LEANING))
async def test_guidance_filter_off_keeps_leaning_responses(grader: Grader, reason: str) -> None:
    script = scripted({"Reference solution": [LEANING[reason]], QUESTION: ["\\boxed{6}"]})
    engine = LeaningEngine(script, [LEANING[reason]])
    (out,) = await run(engine, grader, [problem(solution=LONG_SOLUTION)], resolve_attempts=1, guidance_filter=False)
    assert out.stage is Stage.GUIDED and sum(out.guidance_rejected.values()) == 0
    assert "guidance_check" not in out.examples[0].meta


async def test_guidance_filter_scores_only_what_the_text_passes(grader: Grader) -> None:
    # Text-rejected responses cost no scoring; a response the text passes is scored once on each prompt,
    # and with `score` off its record carries no target even though the check scored it.
    echo = LEANING["echo"]
    script = scripted({"Reference solution": [echo, CLEAN], QUESTION: ["\\boxed{6}"]})
    engine = FakeEngine(script)
    (out,) = await run(engine, grader, [problem()], k=1, resolve_attempts=2, score=False)
    assert out.guidance_rejected["echo"] == 1 and [e.response for e in out.examples] == [CLEAN]
    scored = [c.prompt for c in engine.calls if c.kind == "score"]
    assert len(scored) == 2 and sum("Reference solution" in p for p in scored) == 1
    assert out.examples[0].target_logprobs is None
    assert out.examples[0].meta["guidance_check"]["logprob_gain"] is not None


async def test_a_response_that_only_concludes_with_the_answer_is_not_answer_first(grader: Grader) -> None:
    # Not answer_first; with nothing worked out to the answer it is `unworked`, kept once that is off.
    response = "Adding two and three gives \\boxed{5}."
    engine = FakeEngine(scripted({"Reference solution": [response], QUESTION: ["\\boxed{6}"]}))
    (out,) = await run(engine, grader, [problem()], resolve_attempts=1)
    assert out.stage is Stage.EXPERT and out.guidance_rejected["unworked"] == 1
    engine = FakeEngine(scripted({"Reference solution": [response], QUESTION: ["\\boxed{6}"]}))
    (out,) = await run(engine, grader, [problem()], resolve_attempts=1, guidance_unworked=False)
    assert out.stage is Stage.GUIDED and out.examples[0].meta["guidance_check"]["answer_first"] is False


async def test_fallback_to_expert(grader: Grader) -> None:
    engine = FakeEngine(scripted({QUESTION: ["\\boxed{6}"]}))
    (out,) = await run(engine, grader, [problem()], k=2, resolve_attempts=2)
    assert out.stage is Stage.EXPERT and out.self_attempts == 2 and out.guided_attempts == 2
    (ex,) = out.examples
    assert ex.response == SOLUTION and ex.grade == "reference" and ex.behavior_logprobs is None
    assert ex.completion_token_ids == engine.encode_completion(SOLUTION)
    assert len(ex.target_logprobs) == len(ex.completion_token_ids)
    assert ex.meta["source"] == "solution"


async def test_expert_from_answer_only_and_fallback_switch(grader: Grader) -> None:
    engine = FakeEngine(scripted({QUESTION: ["\\boxed{6}"]}))
    (out,) = await run(engine, grader, [problem(solution=None)], k=1, resolve_attempts=1)
    assert out.examples[0].response == "5" and out.examples[0].meta["source"] == "answer"
    (off,) = await run(FakeEngine(engine.script), grader, [problem()], expert_fallback=False)
    assert off.examples == [] and off.stage is None


async def test_ungradable_goes_to_expert_without_sampling(grader: Grader) -> None:
    engine = FakeEngine(scripted({}))
    essay = problem("essay", "Write a sentence about numbers.", "Numbers are everywhere.", None)
    bare = problem("bare", "Say something.", None, None)
    essay_out, bare_out = await run(engine, grader, [essay, bare])
    assert not [c for c in engine.calls if c.kind == "generate"]
    assert essay_out.ungradable and essay_out.stage is Stage.EXPERT
    assert essay_out.examples[0].grade == "ungradable" and essay_out.examples[0].answer is None
    assert bare_out.ungradable and bare_out.examples == [] and bare_out.stage is None
    summary = Summary.from_outcomes([essay_out, bare_out])
    assert summary.ungradable == 1 and summary.dropped == 1 and summary.stage_problems["expert"] == 1


async def test_truncated_response_is_never_kept(grader: Grader) -> None:
    long = "\\boxed{5} is what I first thought, but let me check this again very carefully"
    engine = FakeEngine(scripted({QUESTION: [long]}))
    (out,) = await run(engine, grader, [problem()], k=2, resolve_attempts=0, max_tokens=20)
    assert out.truncated_rejected == 2 and out.self_correct == 0 and out.stage is Stage.EXPERT
    assert out.generated_tokens == 40  # cut at max_tokens, no EOS


async def test_all_stage_one_prompts_of_a_batch_in_flight_at_once(grader: Grader) -> None:
    engine = FakeEngine(delay=0.05)  # default arithmetic script
    questions = [f"What is {a}+{b}?" for a, b in [(1, 1), (2, 2), (1, 2), (3, 3), (2, 3)]]
    problems = [problem(f"q{i}", q, None, str(eval(q[8:-1]))) for i, q in enumerate(questions)]
    outs = await run(engine, grader, problems, k=2, rounds=1)
    assert engine.max_in_flight["generate"] == len(problems)
    first = engine.calls[: len(problems)]
    assert all(c.kind == "generate" and c.n == 2 for c in first)
    # No barrier before scoring: the self-solved problems are scored while the others re-solve.
    assert [o.stage for o in outs].count(Stage.GUIDED) == 2
    kinds = [c.kind for c in engine.calls]
    assert kinds.index("score") < len(kinds) - 1 - kinds[::-1].index("generate")


async def test_default_script_reaches_each_stage(grader: Grader) -> None:
    engine = FakeEngine.from_config()
    problems = [
        problem("always", "What is 1+1?", None, "2"),  # (1+1) % 3 == 2: always right
        problem("second", "What is 2+2?", None, "4"),  # == 1: wrong, then right
        problem("never", "What is 1+2?", None, "3"),  # == 0: only right when guided
    ]
    outs = await run(engine, grader, problems, k=2, rounds=1)
    assert [o.stage for o in outs] == [Stage.SELF, Stage.SELF, Stage.GUIDED]
    assert [o.self_correct for o in outs] == [1, 1, 0]  # "always" stops at its first keeper


async def test_reload_changes_outputs(grader: Grader, tmp_path) -> None:
    engine = FakeEngine.from_config()
    ids = engine.render_prompt(solve_messages("What is 2+2?"))
    sampling = params().model_dump()
    cfg = SamplingConfig(n=1, temperature=sampling["temperature"], max_tokens=100)
    before = await engine.generate(ids, cfg)
    engine._drawn.clear()
    await engine.reload(str(tmp_path))
    after = await engine.generate(ids, cfg)
    assert before[0].text != after[0].text
    with pytest.raises(FileNotFoundError):
        await engine.reload(str(tmp_path / "missing"))


async def test_ids_are_deterministic_across_runs(grader: Grader) -> None:
    problems = [problem("a", "What is 1+1?", None, "2"), problem("b", "What is 1+2?", "1 + 2 = 3", "3")]

    async def ids(salt: str) -> list[str]:
        outs = await rewrite_batch(problems, FakeEngine.from_config(), grader, params(), id_salt=salt)
        return [e.id for o in outs for e in o.examples]

    first, second, other = await ids("data.jsonl"), await ids("data.jsonl"), await ids("other.jsonl")
    assert first == second and len(set(first)) == len(first)
    assert not set(first) & set(other)


async def test_policy_version_is_stamped(grader: Grader) -> None:
    outs = await rewrite_batch([problem()], FakeEngine(scripted({})), grader, params(), policy_version=3)
    assert outs[0].examples[0].policy_version == 3


def test_round_sizes() -> None:
    assert round_sizes(4, 2) == [2, 2]
    assert round_sizes(5, 2) == [3, 2]
    assert round_sizes(1, 3) == [1]
    assert round_sizes(0, 2) == []


async def test_summary_counts_and_table(grader: Grader) -> None:
    engine = FakeEngine.from_config()
    problems = [
        problem("s", "What is 1+1?", None, "2"),
        problem("g", "What is 1+2?", None, "3"),
        problem("u", "Describe a square.", "A square has four equal sides.", None),
    ]
    # keep=2, but the default script repeats its text: identical responses are kept once
    summary = Summary.from_outcomes(await run(engine, grader, problems, keep=2), wall_seconds=2.0)
    data = summary.to_dict()
    assert data["problems"] == 3 and data["examples"] == 3
    assert data["stages"]["self"] == {"problems": 1, "examples": 1, "percent_problems": 33.33}
    assert data["stages"]["guided"]["problems"] == 1 and data["stages"]["expert"]["problems"] == 1
    assert data["ungradable"] == 1 and data["generated_tokens"] == engine.stats.generated_tokens
    assert data["tokens_per_second"] == pytest.approx(engine.stats.generated_tokens / 2.0, abs=0.01)
    console = Console(record=True, width=120)
    console.print(summary.table())
    text = console.export_text()
    assert "guided" in text and "ungradable" in text


async def test_requests_too_long_for_the_context_fail_only_their_stage(grader: Grader) -> None:
    # 300 tokens: the plain prompt and the short expert solution fit; any guided prompt does not.
    engine = FakeEngine(scripted({QUESTION: ["\\boxed{6}"]}), max_model_len=300)
    long_solution = "Two and three make five. " * 16 + "\n#### 5"
    problems = [problem("short"), problem("long", solution=long_solution)]
    short, long = await run(engine, grader, problems, rounds=2, resolve_attempts=2)
    assert short.stage is Stage.EXPERT and short.examples[0].response == SOLUTION
    assert [r.split(":")[0] for r in short.rejected] == ["guided prompt"]  # once: round 2 does not retry it
    assert short.guided_attempts == 0
    assert long.examples == [] and long.stage is None  # its solution cannot be scored in 300 tokens
    assert [r.split(":")[0] for r in long.rejected] == ["guided prompt", "scoring the expert response"]
    summary = Summary.from_outcomes([short, long])
    assert summary.rejected_requests == 3 and summary.dropped == 1


class GatedEngine(FakeEngine):
    """A fake whose sampling requests for prompts containing `slow` wait until `gate` opens; logs finished ones."""

    def __init__(self, script: Script, slow: str) -> None:
        super().__init__(script)
        self.slow = slow
        self.gate = asyncio.Event()
        self.log: list[str] = []
        self.cancelled_waits = 0

    def _name(self, prompt: str) -> str:
        return "slow" if self.slow in prompt else "fast"

    @asynccontextmanager
    async def stream(self, prompt_ids: Sequence[int], params: SamplingConfig) -> AsyncIterator[SampleStream]:
        prompt = self.decode(prompt_ids)
        if self.slow in prompt:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled_waits += 1
                raise
        async with super().stream(prompt_ids, params) as samples:
            yield samples
        stage = "guided" if "Reference solution" in prompt else "self"
        self.log.append(f"{stage} {self._name(prompt)}")

    async def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        scores = await super().score(prompt_ids, completion_ids)
        name = self._name(self.decode(prompt_ids))
        self.log.append(f"score {name}")
        if name == "fast":
            self.gate.set()  # only now may the slow problem's first round finish
        return scores


SLOW = "What is 1 plus 1?"


async def test_no_barrier_between_problems(grader: Grader) -> None:
    # The fast problem fails its two self rounds, is re-solved with guidance and scored, all while the
    # slow problem's first self round is still being sampled. A batch-wide barrier would deadlock here.
    engine = GatedEngine(
        scripted(
            {
                "Reference solution": ["Adding two and three gives 2 + 3 = \\boxed{5}."],
                SLOW: ["\\boxed{2}"],
                QUESTION: ["\\boxed{6}"],
            }
        ),
        slow=SLOW,
    )
    problems = [problem("fast"), problem("slow", SLOW, "1 + 1 = 2\n#### 2", "2")]
    # guidance filter off: its scoring passes would interleave with the log this test is about
    runs = run(engine, grader, problems, k=2, resolve_attempts=2, rounds=2, guidance_filter=False)
    fast, slow = await asyncio.wait_for(runs, 20)
    assert engine.log == ["self fast", "self fast", "guided fast", "score fast", "self slow", "score slow"]
    assert fast.stage is Stage.GUIDED and fast.self_attempts == 2 and fast.guided_attempts == 1
    assert slow.stage is Stage.SELF and slow.self_attempts == 1
    assert [o.problem.id for o in (fast, slow)] == ["fast", "slow"]  # outcomes in input order


async def test_a_failing_problem_cancels_the_rest_of_its_batch(grader: Grader) -> None:
    class Broken(GatedEngine):
        def stream(
            self, prompt_ids: Sequence[int], params: SamplingConfig
        ) -> AbstractAsyncContextManager[SampleStream]:
            if self.slow not in self.decode(prompt_ids):
                raise RuntimeError("engine died")
            return super().stream(prompt_ids, params)

    engine = Broken(scripted({}), slow=SLOW)
    with pytest.raises(RuntimeError, match="engine died"):  # the error itself, not an exception group
        await asyncio.wait_for(run(engine, grader, [problem("slow", SLOW, None, "2"), problem("fast")]), 20)
    assert engine.cancelled_waits == 1  # the slow problem's request was abandoned, not left running


async def test_first_keeper_aborts_the_rest_of_its_round(grader: Grader) -> None:
    quick, slow = "So \\boxed{5}.", "Let me think about this for a long while first. " * 3 + "\\boxed{5}."
    engine = FakeEngine(scripted({QUESTION: [slow, slow, quick, slow]}))
    (out,) = await run(engine, grader, [problem()], k=4, rounds=1)
    assert out.stage is Stage.SELF and [e.response for e in out.examples] == [quick]
    assert out.self_attempts == 1 and out.self_correct == 1 and out.aborted == 3
    # the three cut samples held as many tokens as the keeper when they were stopped, and they count
    assert out.generated_tokens == 4 * len(engine.encode_completion(quick))
    assert engine.stats.generated_tokens == out.generated_tokens


async def test_guided_round_stops_at_its_first_keeper(grader: Grader) -> None:
    wrong = "\\boxed{6}"
    guided = [
        "Adding two and three gives 2 + 3 = \\boxed{5}.",
        "Two and three, added one by one, give 2 + 3 = \\boxed{5} in the end.",
    ]
    engine = FakeEngine(scripted({"Reference solution": guided, QUESTION: [wrong]}))
    (out,) = await run(engine, grader, [problem()], k=2, resolve_attempts=4, rounds=2)
    assert out.stage is Stage.GUIDED and out.self_attempts == 2 and out.aborted == 1
    assert out.guided_attempts == 1 and generate_calls(engine, "Reference solution") == [2]
    first = len(engine.encode_completion(guided[0]))
    assert out.generated_tokens == 2 * len(engine.encode_completion(wrong)) + 2 * first


async def test_aborting_rounds_changes_no_stage_outcome(grader: Grader) -> None:
    # The default script on problems of every kind: stopping at the first keeper (keep=1) must reach the
    # same stage for every problem as rounds that always run to the end (keep=k: a round only stops early
    # when all its samples are keepers, i.e. when there is nothing left to abort), on fewer tokens.
    pairs = [(a, b) for a in range(1, 7) for b in range(1, 4)]
    problems = [problem(f"q{a}-{b}", f"What is {a}+{b}?", f"{a} + {b} = {a + b}", str(a + b)) for a, b in pairs]
    stopped = await run(FakeEngine.from_config(), grader, problems, k=4, keep=1, rounds=2)
    full = await run(FakeEngine.from_config(), grader, problems, k=4, keep=4, rounds=2)
    assert [o.stage for o in stopped] == [o.stage for o in full]
    assert {o.stage for o in stopped} == {Stage.SELF, Stage.GUIDED}
    assert sum(o.aborted for o in stopped) > 0 and sum(o.aborted for o in full) == 0
    assert sum(o.generated_tokens for o in stopped) < sum(o.generated_tokens for o in full)


@pytest.mark.parametrize("score", [False, True])
async def test_scoring_only_when_asked(grader: Grader, score: bool) -> None:
    # three problems, one per stage (the default script: 3+0 and 1+0 unsolved alone, 2+0 solved)
    problems = [problem(f"q{a}", f"What is {a}+0?", f"{a} + 0 = {a}\n#### {a}", str(a)) for a in (2, 3)]
    problems.append(problem("x", "What is 1+0?", "Add nothing to one.", None))  # ungradable: expert only
    engine = FakeEngine()
    # the guidance filter's own scoring is tested in test_guidance_filter_scores_only_what_the_text_passes
    outcomes = await rewrite_batch(problems, engine, grader, params(score=score, top_p=0.9, guidance_filter=False))
    examples = [e for out in outcomes for e in out.examples]
    assert {e.stage for e in examples} >= {Stage.SELF, Stage.GUIDED, Stage.EXPERT}
    scored = [c for c in engine.calls if c.kind == "score"]
    assert len(scored) == (len(examples) if score else 0)
    assert engine.stats.scored_tokens == (sum(len(e.completion_token_ids) for e in examples) if score else 0)
    for e in examples:
        assert (e.target_logprobs is not None) == score
        # sampled records carry the distribution they were drawn from; expert text has none
        if e.stage is Stage.EXPERT:
            assert e.sampling is None and e.behavior_logprobs is None
        else:
            assert e.sampling is not None and (e.sampling.temperature, e.sampling.top_p) == (0.7, 0.9)
    assert StageParams().score is False


async def test_a_response_without_an_explicit_final_answer_is_not_kept(grader: Grader) -> None:
    # Its last number is the gold answer, which evaluation's lenient extraction would grade correct.
    implicit = "Step 1: 2 apples. Step 2: 3 more. That makes 5"
    engine = FakeEngine(scripted({QUESTION: [implicit, implicit, "So it is \\boxed{5}."]}))
    (out,) = await run(engine, grader, [problem()], k=2, resolve_attempts=0, expert_fallback=False)
    assert out.examples == [] and out.no_answer_rejected == 2 and out.self_correct == 0
    (out,) = await run(engine, grader, [problem()], k=1, resolve_attempts=0)  # the third sample states it
    assert [e.response for e in out.examples] == ["So it is \\boxed{5}."]
    summary = Summary.from_outcomes(await run(FakeEngine(scripted({QUESTION: [implicit]})), grader, [problem()]))
    assert summary.no_answer_rejected == 6 and summary.to_dict()["no_answer_rejected"] == 6  # k=4 + 2 guided
