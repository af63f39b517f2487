"""Guided Re-solving over one batch of problems: self → guided → expert, as pure logic over the Engine.

The pipeline never references vLLM, Redis or HTTP: the offline CLI and the service both hand it an
`Engine` and a `Grader` and get `ProblemOutcome`s back.

Scheduling: each problem runs as its own coroutine (its self rounds, its guided rounds if it is still
unsolved, the expert fallback, then scoring its kept responses when `params.score` asks), and all
problems of a batch run concurrently. There is no barrier between problems: a problem whose round is
done is graded at once and sends its next request (next round, next stage, or scoring) while the others
are still sampling. The engine's continuous batching then batches whatever is in flight (one problem's
guided re-solving beside another's self samples and a third's scoring) instead of idling at every round
while the batch's longest response finishes. Each problem grades its own samples (`Grader.grade_batch`,
which serialises concurrent calls on its process pool; grading takes milliseconds, sampling seconds).

A round ends at its first keeper: the samples of a round stream out of the engine as each finishes
(`Engine.stream`), each is graded as it arrives, and once the problem holds `keep` correct responses the
samples still running are aborted and the problem goes on to its next step. Their tokens still count in
`generated_tokens` (the engine spent them), as `aborted` samples rather than attempts. Which problems
reach which stage does not change: a stage is left early only once it has produced what it would keep.

Prefix sharing: the samples of one prompt in a round are sent together, as `n` one-sample requests
(`Engine.stream`) so that each is graded as it finishes and the rest aborted at the first keeper. They
share the prompt's KV blocks through prefix caching (on by default: `EngineConfig.enable_prefix_caching`),
and a later round of the same prompt reuses the blocks while they are cached. Only full blocks are
shared (16 tokens on a GPU, 128 on CPU, where a plain prompt shorter than a block is computed per
sample, which costs little next to decoding). Scoring requests always recompute their prompt: vLLM
skips the prefix cache for a request that asks for prompt log-probs.

Decisions the design notes leave open, made here:
- A response that did not finish (cut at `max_tokens`, or aborted) is never kept: its final answer may
  be mid-thought even when it happens to match. It is counted as `truncated_rejected`.
- A response is kept only when it states its final answer explicitly (`\\boxed{}` or an answer phrase,
  `shared.grading.states_final_answer`) and that answer is right: evaluation's last-number fallback
  would grade "Step 2: 4 more. Total unknown." correct for gold 4. Finished responses without an
  explicit answer are not graded and are counted as `no_answer_rejected`.
- Sampling runs in `params.rounds` rounds per stage; a problem that already holds `keep` correct
  responses is not sampled again (early stop), and its round in flight is aborted. Stage 2 runs only
  for problems with no correct self sample.
- Guidance modes `solution` and `hint` need a reference solution; a problem without one is guided with
  its gold answer (`answer` mode) instead, and `meta.guidance` records the mode actually used.
- Expert fallback uses the reference solution; a problem with only an answer falls back to the answer
  text itself (the dataset's own demonstration, not a made-up one). A problem with neither yields no
  example and is counted as dropped. `params.expert_format = "boxed"` rewrites the demonstration in the
  solve prompt's convention (`shared.prompts.expert_text`); its completion ends with the chat template's
  end-of-turn token like a sampled one (`Engine.encode_completion`).
- A problem whose gold answer cannot be determined is not sampled: it goes straight to the expert
  fallback with grade `ungradable`.
- A request the engine refuses (`RequestRejected`: a guided prompt or an expert solution longer than
  the model's context) fails only that problem's stage: it moves on to the next stage, and a response
  that cannot be scored is not kept. The reasons are kept in `ProblemOutcome.rejected`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rich.table import Table

from services.engine import Engine, RequestRejected, Sample, SamplingConfig
from services.guidance_filter import (
    REASONS,
    GuidanceCheck,
    GuidanceContext,
    GuidanceLimits,
    guidance_context,
    limits_of,
    logprob_gain,
    text_check,
    with_likelihood,
)
from shared.config import ExpertFormat, GuidanceMode, StageParams
from shared.dataio import RECORD_META
from shared.grading import Grader, extract_gold, extract_prediction, states_final_answer
from shared.prompts import expert_text, guided_messages, solve_messages
from shared.schema import ChatMessage, Example, Grade, Problem, Sampling, Stage, example_id, wire_logprobs

STAGES = (Stage.SELF, Stage.GUIDED, Stage.EXPERT)


@dataclass
class ProblemOutcome:
    """What the pipeline made of one problem: its examples and the counters behind them."""

    problem: Problem
    examples: list[Example] = field(default_factory=list)
    stage: Stage | None = None  # the stage that produced the examples; None when dropped
    ungradable: bool = False
    generated_tokens: int = 0
    self_attempts: int = 0
    guided_attempts: int = 0
    self_correct: int = 0
    guided_correct: int = 0
    # correct guided responses the guidance-dependence filter rejected, per reason (services.guidance_filter)
    guidance_rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    truncated_rejected: int = 0
    no_answer_rejected: int = 0  # finished responses that never state their final answer explicitly
    aborted: int = 0  # samples stopped once the problem held `keep` (not attempts: never graded)
    guidance: GuidanceMode | None = None
    rejected: list[str] = field(default_factory=list)  # requests the engine refused, with the reason


@dataclass
class _Kept:
    """A response chosen for training, before it is scored."""

    stage: Stage
    text: str
    token_ids: list[int]
    behavior_logprobs: list[float] | None
    grade: Grade
    finish_reason: str | None = None
    source: str | None = None  # expert only: "solution" or "answer"
    guidance_check: GuidanceCheck | None = None  # guided only, when the filter is on
    target: list[float] | None = None  # its plain-prompt scores when the filter already took them


@dataclass
class _Work:
    """One problem's state while it moves through its stages."""

    outcome: ProblemOutcome
    gold: str | None
    plain_prompt: list[int]
    kept: list[_Kept] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    guidance: GuidanceContext | None = None  # set when stage 2 runs

    @property
    def problem(self) -> Problem:
        return self.outcome.problem


def round_sizes(total: int, rounds: int) -> list[int]:
    """Split `total` samples into at most `rounds` rounds, larger rounds first (e.g. 5, 2 → [3, 2])."""
    base, extra = divmod(total, rounds)
    return [size for i in range(rounds) if (size := base + (1 if i < extra else 0)) > 0]


async def rewrite_batch(
    problems: Sequence[Problem],
    engine: Engine,
    grader: Grader,
    params: StageParams,
    policy_version: int = 0,
    id_salt: str = "",
) -> list[ProblemOutcome]:
    """Run the three stages of Guided Re-solving on `problems`; one outcome per problem, in order."""
    works: list[_Work] = []
    for p in problems:
        gold = extract_gold(p.answer, p.solution)
        prompt = engine.render_prompt(solve_messages(p.question))
        works.append(_Work(ProblemOutcome(problem=p, ungradable=gold is None), gold, prompt))
    tasks = [asyncio.create_task(_rewrite_problem(w, engine, grader, params, policy_version, id_salt)) for w in works]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # gather leaves the other problems running on a failure: stop them, so a failed (or cancelled)
        # batch leaves no requests behind in the engine, and re-raise the first error as it was.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return [w.outcome for w in works]


async def _rewrite_problem(
    w: _Work, engine: Engine, grader: Grader, params: StageParams, policy_version: int, id_salt: str
) -> None:
    """One problem from its first self round to its scored examples, at its own pace."""
    if w.gold is not None:
        # Stage 1: the policy on the plain prompt.
        await _sample_stage(w, Stage.SELF, w.plain_prompt, params.k, params, engine, grader)
        if not w.kept:
            # Stage 2: guided re-solving, only without a correct self sample.
            mode = params.guidance if w.problem.solution else "answer"
            w.outcome.guidance = mode
            w.guidance = guidance_context(w.problem.question, w.problem.solution, w.gold, mode, params.hint_fraction)
            guided_prompt = engine.render_prompt(
                guided_messages(w.problem.question, w.problem.solution, w.gold, mode, params.hint_fraction)
            )
            await _sample_stage(w, Stage.GUIDED, guided_prompt, params.resolve_attempts, params, engine, grader)

    # Stage 3: the expert demonstration, when nothing else was kept.
    if not w.kept and (w.outcome.ungradable or params.expert_fallback):
        expert = _expert_response(w, engine, params.expert_format)
        if expert is not None:
            w.kept.append(expert)

    # target_logprobs, only when the job asks: every kept response scored on the training prompt.
    scores: Sequence[list[float] | BaseException | None] = [None] * len(w.kept)
    if params.score:
        calls = (_target(engine, w.plain_prompt, k) for k in w.kept)
        scores = await asyncio.gather(*calls, return_exceptions=True)
    # Every stage of one problem samples with the same temperature and top-p.
    sampling = Sampling(temperature=params.temperature, top_p=params.top_p)
    for kept, target in zip(w.kept, scores, strict=True):
        if isinstance(target, RequestRejected):
            w.outcome.rejected.append(f"scoring the {kept.stage.value} response: {target}")
        elif isinstance(target, BaseException):
            raise target
        else:
            w.outcome.examples.append(_example(w, kept, target, sampling, policy_version, id_salt))
    w.outcome.stage = w.outcome.examples[0].stage if w.outcome.examples else None


async def _target(engine: Engine, prompt: list[int], kept: _Kept) -> list[float]:
    """`kept` scored on the training prompt (the guidance filter may have done so already)."""
    return kept.target if kept.target is not None else await engine.score(prompt, kept.token_ids)


async def _sample_stage(
    w: _Work,
    stage: Stage,
    prompt: list[int],
    total: int,
    params: StageParams,
    engine: Engine,
    grader: Grader,
) -> None:
    """Sample `total` responses to `prompt` in rounds, grade them, and keep up to `params.keep` distinct."""
    for n in round_sizes(total, params.rounds):
        if len(w.kept) >= params.keep:
            return
        sampling = SamplingConfig(n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens)
        try:
            await _sample_round(w, stage, prompt, sampling, params, engine, grader)
        except RequestRejected as exc:
            w.outcome.rejected.append(f"{stage.value} prompt: {exc}")
            return  # the same prompt would be refused again: this stage is over for the problem


async def _sample_round(
    w: _Work,
    stage: Stage,
    prompt: list[int],
    sampling: SamplingConfig,
    params: StageParams,
    engine: Engine,
    grader: Grader,
) -> None:
    """One round: grade each sample as it finishes, and abort the rest once the problem holds `keep`."""
    out = w.outcome
    async with engine.stream(prompt, sampling) as samples:
        async for s in samples:
            out.generated_tokens += len(s.token_ids)
            if stage is Stage.SELF:
                out.self_attempts += 1
            else:
                out.guided_attempts += 1
            if s.finish_reason != "stop":
                out.truncated_rejected += 1
                continue
            if not states_final_answer(s.text):
                out.no_answer_rejected += 1
                continue
            (correct,) = await grader.grade_batch([(s.text, w.gold or "")])
            if correct:
                await _consider(w, s, stage, prompt, params, engine)
            if len(w.kept) >= params.keep:
                # The tokens already spent on the samples still running count; grading them cannot
                # change what is kept.
                cut = await samples.abort()
                out.generated_tokens += sum(len(c.token_ids) for c in cut)
                out.aborted += len(cut)
                return


async def _consider(w: _Work, s: Sample, stage: Stage, prompt: list[int], params: StageParams, engine: Engine) -> None:
    """Count a correct response and keep it if it is new, `keep` is not reached and, for a guided one,
    it does not lean on the guidance."""
    out = w.outcome
    if stage is Stage.SELF:
        out.self_correct += 1
    else:
        out.guided_correct += 1
    text_key = s.text.strip()
    if text_key in w.seen or len(w.kept) >= params.keep:
        return
    w.seen.add(text_key)
    kept = _Kept(
        stage=stage,
        text=s.text,
        token_ids=list(s.token_ids),
        behavior_logprobs=list(s.logprobs),
        grade="correct",
        finish_reason=s.finish_reason,
    )
    if stage is Stage.GUIDED and w.guidance is not None and params.guidance_filter:
        try:
            kept = await _check_guidance(w, kept, w.guidance, prompt, limits_of(params), engine)
        except RequestRejected as exc:
            out.rejected.append(f"scoring the guided response for the guidance check: {exc}")
            return
        if kept.guidance_check is not None and kept.guidance_check.reason is not None:
            out.guidance_rejected[kept.guidance_check.reason] += 1
            return
    w.kept.append(kept)


async def _check_guidance(
    w: _Work, kept: _Kept, ctx: GuidanceContext, guided_prompt: list[int], limits: GuidanceLimits, engine: Engine
) -> _Kept:
    """`kept` with its guidance check. The text signals first; only a response they pass is scored on
    both prompts (temperature 1) for the likelihood signal, and its plain scores are kept as its target."""
    check = text_check(kept.text, ctx, limits)
    if check.reason is not None or limits.max_logprob_gain is None:
        return replace(kept, guidance_check=check)
    plain, guided = await asyncio.gather(
        engine.score(w.plain_prompt, kept.token_ids), engine.score(guided_prompt, kept.token_ids)
    )
    gain = logprob_gain(plain, guided, limits.gain_window)
    return replace(kept, guidance_check=with_likelihood(check, gain, limits), target=plain)


def _expert_response(w: _Work, engine: Engine, fmt: ExpertFormat) -> _Kept | None:
    """The expert demonstration (solution, else the bare answer) in `fmt`, or None when the row has neither."""
    p = w.problem
    text = expert_text(p.solution, p.answer, w.gold, fmt)
    if text is None:
        return None
    source = "solution" if p.solution else "answer"
    return _Kept(
        stage=Stage.EXPERT,
        text=text,
        token_ids=engine.encode_completion(text),
        behavior_logprobs=None,
        grade="ungradable" if w.outcome.ungradable else "reference",
        source=source,
    )


def _example(
    w: _Work, kept: _Kept, target: list[float] | None, sampling: Sampling, policy_version: int, id_salt: str
) -> Example:
    out = w.outcome
    index = sum(1 for e in out.examples if e.stage is kept.stage)
    meta: dict[str, Any] = {
        "guidance": out.guidance,
        "self_attempts": out.self_attempts,
        "guided_attempts": out.guided_attempts,
        "guidance_rejected": dict(out.guidance_rejected),
        "truncated_rejected": out.truncated_rejected,
        "no_answer_rejected": out.no_answer_rejected,
        "finish_reason": kept.finish_reason,
    }
    if kept.stage is Stage.EXPERT:
        meta["source"] = kept.source
    else:
        meta["predicted"] = extract_prediction(kept.text, strict=True)
    if kept.guidance_check is not None:
        meta["guidance_check"] = kept.guidance_check.to_meta()
    meta |= {key: w.problem.meta[key] for key in RECORD_META if key in w.problem.meta}
    return Example(
        id=example_id(id_salt, w.problem.id, kept.stage.value, index),
        problem_id=w.problem.id,
        prompt=solve_messages(w.problem.question),
        completion=[ChatMessage(role="assistant", content=kept.text)],
        completion_token_ids=kept.token_ids,
        stage=kept.stage,
        policy_version=policy_version,
        # Behaviour log-probs are under the sampling distribution; expert text has neither.
        sampling=None if kept.behavior_logprobs is None else sampling,
        behavior_logprobs=None if kept.behavior_logprobs is None else wire_logprobs(kept.behavior_logprobs),
        target_logprobs=None if target is None else wire_logprobs(target),
        answer=w.gold,
        grade=kept.grade,
        meta=meta,
    )


@dataclass
class Summary:
    """Run totals: problems and examples per stage, ungradable/dropped counts, token throughput."""

    problems: int = 0
    stage_problems: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in STAGES})
    stage_examples: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in STAGES})
    ungradable: int = 0  # expert fallbacks of problems without a gold answer (also counted in expert)
    dropped: int = 0  # problems that produced no example
    skipped_rows: int = 0  # input rows rejected before the pipeline (bad JSON, no question, …)
    response_tokens: int = 0
    generated_tokens: int = 0
    # correct guided responses rejected for leaning on the guidance, per reason
    guidance_rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    truncated_rejected: int = 0
    no_answer_rejected: int = 0  # finished responses without an explicit final answer
    aborted_samples: int = 0  # samples stopped once their problem held `keep`
    rejected_requests: int = 0  # requests the engine refused (too long for the context)
    wall_seconds: float = 0.0

    @classmethod
    def from_outcomes(cls, outcomes: Iterable[ProblemOutcome], wall_seconds: float = 0.0) -> Summary:
        """A summary of `outcomes` over `wall_seconds` of run time."""
        summary = cls(wall_seconds=wall_seconds)
        summary.add(outcomes)
        return summary

    def add(self, outcomes: Iterable[ProblemOutcome]) -> None:
        """Accumulate more outcomes (a run summarises batch after batch)."""
        for out in outcomes:
            self.problems += 1
            self.generated_tokens += out.generated_tokens
            for reason, n in out.guidance_rejected.items():
                self.guidance_rejected[reason] += n
            self.truncated_rejected += out.truncated_rejected
            self.no_answer_rejected += out.no_answer_rejected
            self.aborted_samples += out.aborted
            self.rejected_requests += len(out.rejected)
            if out.stage is None:
                self.dropped += 1
                continue
            self.ungradable += out.ungradable
            self.stage_problems[out.stage.value] += 1
            for ex in out.examples:
                self.stage_examples[ex.stage.value] += 1
                self.response_tokens += len(ex.completion_token_ids)

    @property
    def examples(self) -> int:
        """Examples produced, all stages together."""
        return sum(self.stage_examples.values())

    @property
    def mean_response_tokens(self) -> float:
        """Mean completion length of the produced examples, in tokens."""
        return self.response_tokens / self.examples if self.examples else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated (sampled) tokens per second of wall time."""
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def percent(self, stage: Stage) -> float:
        """Share of problems whose examples came from `stage`, in percent."""
        return 100.0 * self.stage_problems[stage.value] / self.problems if self.problems else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the summary JSON written beside the output."""
        return {
            "problems": self.problems,
            "examples": self.examples,
            "stages": {
                s.value: {
                    "problems": self.stage_problems[s.value],
                    "examples": self.stage_examples[s.value],
                    "percent_problems": round(self.percent(s), 2),
                }
                for s in STAGES
            },
            "ungradable": self.ungradable,
            "dropped": self.dropped,
            "skipped_rows": self.skipped_rows,
            "guidance_rejected": dict(self.guidance_rejected),
            "truncated_rejected": self.truncated_rejected,
            "no_answer_rejected": self.no_answer_rejected,
            "aborted_samples": self.aborted_samples,
            "rejected_requests": self.rejected_requests,
            "mean_response_tokens": round(self.mean_response_tokens, 2),
            "generated_tokens": self.generated_tokens,
            "wall_seconds": round(self.wall_seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
        }

    def table(self) -> Table:
        """The stage table printed at the end of a run."""
        table = Table(title=f"mindgap rewrite: {self.problems} problems → {self.examples} examples")
        table.add_column("stage")
        table.add_column("problems", justify="right")
        table.add_column("% problems", justify="right")
        table.add_column("examples", justify="right")
        for s in STAGES:
            n = self.stage_problems[s.value]
            table.add_row(s.value, str(n), f"{self.percent(s):.1f}", str(self.stage_examples[s.value]))
        table.add_section()
        table.add_row("of which ungradable", str(self.ungradable), "", "")
        table.add_row("dropped (no example)", str(self.dropped), "", "")
        table.add_row("skipped input rows", str(self.skipped_rows), "", "")
        rejected = " · ".join(f"{reason} {n}" for reason, n in self.guidance_rejected.items())
        table.caption = (
            f"mean response {self.mean_response_tokens:.1f} tokens · generated {self.generated_tokens} tokens"
            f" in {self.wall_seconds:.1f} s ({self.tokens_per_second:.1f} tok/s) · guided responses leaning on"
            f" the guidance: {rejected} · truncated rejected {self.truncated_rejected} · no explicit answer"
            f" {self.no_answer_rejected} · aborted once solved"
            f" {self.aborted_samples} · requests refused by the"
            f" engine {self.rejected_requests}"
        )
        return table
