"""Bench child processes that hold a vLLM engine: the service, the plain `LLM.generate` loop, the engine lines.

Run as `python -m mindgap.bench.engine_worker KIND SPEC.json RESULT.json`; each kind reads its workload
from SPEC and writes its timings to RESULT. Engines live only in these children, one at a time, so
their memory is sampled alone and a vLLM abort at interpreter exit cannot take the bench down.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STARTED = time.monotonic()  # before vLLM is imported: a cold start counts the imports too


def _write(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


def serve(spec: dict[str, Any]) -> None:
    """The mindgap service (FastAPI + in-process vLLM) on `spec`'s ServiceConfig, until SIGTERM."""
    import uvicorn

    from services.app import create_app
    from services.settings import ServiceConfig

    cfg = ServiceConfig.model_validate(spec)
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="warning")


def plain_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """The baseline: the pipeline's requests for unsolved problems sent to vLLM's offline `LLM.generate`.

    One batched call samples `k` responses for every plain prompt, a second `resolve_attempts` for every
    guided prompt: what the service asks of its engine when nothing is solved, without the service.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from shared.config import StageParams
    from shared.grading import extract_gold
    from shared.prompts import guided_messages, render_prompt_ids, solve_messages, turn_end_ids
    from shared.schema import Problem

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec["kv_cache_gib"])
    start = time.monotonic()
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        seed=spec["seed"],
        enable_prefix_caching=True,
        logprobs_mode="processed_logprobs",
        disable_log_stats=True,
    )
    created = time.monotonic() - start
    tokenizer: Any = llm.get_tokenizer()
    params = StageParams.model_validate(spec["params"])
    problems = [Problem.model_validate(p) for p in spec["problems"]]
    gradable = [(p, gold) for p in problems if (gold := extract_gold(p.answer, p.solution)) is not None]
    plain = [render_prompt_ids(tokenizer, solve_messages(p.question)) for p, _ in gradable]
    guided = [
        render_prompt_ids(
            tokenizer,
            guided_messages(
                p.question, p.solution, gold, params.guidance if p.solution else "answer", params.hint_fraction
            ),
        )
        for p, gold in gradable
    ]

    turn_end = turn_end_ids(tokenizer)

    def sampling(n: int) -> SamplingParams:
        # logprobs=0: the service asks for the sampled tokens' log-probs too
        return SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            logprobs=0,
            stop_token_ids=turn_end,  # as the service's engine stops
        )

    def one_pass() -> tuple[int, float]:
        tokens = 0
        t0 = time.monotonic()
        for prompts, n in ((plain, params.k), (guided, params.resolve_attempts)):
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], sampling(n), use_tqdm=False)
            tokens += sum(len(o.token_ids) for out in outputs for o in out.outputs)
        return tokens, time.monotonic() - t0

    one_pass()  # warm-up
    passes = [one_pass() for _ in range(int(spec["repeat"]))]
    llm.llm_engine.engine_core.shutdown()  # else its engine-core process outlives this one
    return {
        "create_s": created,
        "tokens": [p[0] for p in passes],
        "seconds": [p[1] for p in passes],
    }


async def naive_batch(problems: Sequence[Any], engine: Any, grader: Any, params: Any) -> dict[str, int]:
    """The naive schedule: `k` self samples and `resolve_attempts` guided samples for every problem, in one batch.

    Everything is sampled up front (no rounds, no early stop, no streaming); what is kept follows the
    pipeline's own rules (an explicit, correct final answer; distinct texts; self before guided; the
    guidance-dependence filter on guided responses; the expert fallback), and kept responses are scored
    only when `params.score` asks, as in the pipeline. Returns the generated tokens, the examples, and
    the problems solved by a self or a guided sample.
    """
    from services.engine import SamplingConfig
    from services.guidance_filter import guidance_context, limits_of, logprob_gain, text_check, with_likelihood
    from shared.config import GuidanceMode
    from shared.grading import extract_gold, states_final_answer
    from shared.prompts import expert_text, guided_messages, solve_messages

    golds = [extract_gold(p.answer, p.solution) for p in problems]
    modes: list[GuidanceMode] = [params.guidance if p.solution else "answer" for p in problems]
    plain = [engine.render_prompt(solve_messages(p.question)) for p in problems]
    guided = [
        engine.render_prompt(guided_messages(p.question, p.solution, gold, mode, params.hint_fraction))
        for p, gold, mode in zip(problems, golds, modes, strict=True)
    ]
    gradable = [i for i, gold in enumerate(golds) if gold is not None]

    def sampling(n: int) -> SamplingConfig:
        return SamplingConfig(n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens)

    drawn = await asyncio.gather(
        *(engine.generate(plain[i], sampling(params.k)) for i in gradable),
        *(engine.generate(guided[i], sampling(params.resolve_attempts)) for i in gradable),
    )
    tokens = sum(len(s.token_ids) for samples in drawn for s in samples)
    answered = [
        (i, stage, s)
        for stage, chunk in enumerate((drawn[: len(gradable)], drawn[len(gradable) :]))
        for i, samples in zip(gradable, chunk, strict=True)
        for s in samples
        if s.finish_reason == "stop" and states_final_answer(s.text)  # the pipeline grades only these
    ]
    verdicts = await grader.grade_batch([(s.text, golds[i] or "") for i, _, s in answered])
    correct: dict[int, tuple[list[Any], list[Any]]] = {}
    for (i, stage, s), ok in zip(answered, verdicts, strict=True):
        if ok and s.text.strip() not in {c.text.strip() for c in correct.get(i, ([], []))[stage]}:
            correct.setdefault(i, ([], []))[stage].append(s)
    limits = limits_of(params)

    async def guided_keepers(i: int, candidates: list[Any]) -> list[Any]:
        """The guided responses the pipeline's guidance-dependence filter lets through, up to `keep`."""
        if not params.guidance_filter:
            return candidates[: params.keep]
        p = problems[i]
        ctx = guidance_context(p.question, p.solution, golds[i] or "", modes[i], params.hint_fraction)
        kept: list[Any] = []
        for s in candidates:
            if len(kept) >= params.keep:
                break
            check = text_check(s.text, ctx, limits)
            if check.reason is None and limits.max_logprob_gain is not None:
                ours, theirs = await asyncio.gather(
                    engine.score(plain[i], s.token_ids), engine.score(guided[i], s.token_ids)
                )
                check = with_likelihood(check, logprob_gain(ours, theirs, limits.gain_window), limits)
            if check.reason is None:
                kept.append(s)
        return kept

    unsolved = [i for i in gradable if not correct.get(i, ([], []))[0] and correct.get(i, ([], []))[1]]
    from_guided = dict(
        zip(unsolved, await asyncio.gather(*(guided_keepers(i, correct[i][1]) for i in unsolved)), strict=True)
    )
    to_score: list[tuple[list[int], list[int]]] = []
    solved = {"self": 0, "guided": 0}
    for i, p in enumerate(problems):
        own = correct.get(i, ([], []))[0][: params.keep]
        chosen = own or from_guided.get(i, [])
        if chosen:
            solved["self" if own else "guided"] += 1
        to_score += [(plain[i], list(s.token_ids)) for s in chosen]
        expert = expert_text(p.solution, p.answer, golds[i], params.expert_format)
        if not chosen and expert and (golds[i] is None or params.expert_fallback):
            to_score.append((plain[i], engine.encode_completion(expert)))
    if params.score:
        await asyncio.gather(*(engine.score(prompt, completion) for prompt, completion in to_score))
    return {"tokens": tokens, "examples": len(to_score), **solved}


def drop_page_cache(files: Sequence[Path]) -> None:
    """Ask the kernel to forget `files`' cached pages, so the next read comes from the disk."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_seconds(files: Sequence[Path]) -> float:
    """Seconds to read `files` start to end, after dropping them from the page cache."""
    drop_page_cache(files)
    start = time.monotonic()
    for f in files:
        with open(f, "rb") as handle:
            while handle.read(16 << 20):
                pass
    return time.monotonic() - start


def engine_lines(spec: dict[str, Any]) -> dict[str, Any]:
    """Cold start of a `VLLMEngine`, then the rewrite schedules and/or weight reloads on it."""
    return asyncio.run(_engine_lines(spec))


async def _engine_lines(spec: dict[str, Any]) -> dict[str, Any]:
    from services.engine import SamplingConfig
    from services.pipeline import rewrite_batch
    from services.vllm_engine import VLLMEngine
    from shared.config import EngineConfig, StageParams
    from shared.grading import Grader
    from shared.prompts import solve_messages
    from shared.schema import Problem

    cfg = EngineConfig.model_validate(spec["engine"])
    start = time.monotonic()
    engine = await VLLMEngine.create(cfg)
    result: dict[str, Any] = {"create_s": time.monotonic() - start, "cold_start_s": time.monotonic() - STARTED}
    await engine.generate(engine.render_prompt(solve_messages("What is 2 + 3?")), SamplingConfig(n=2, max_tokens=32))
    repeat = int(spec["repeat"])
    if spec.get("rewrite"):
        workloads = [
            (w["name"], [Problem.model_validate(p) for p in w["problems"]], StageParams.model_validate(w["params"]))
            for w in spec["workloads"]
        ]
        rewrite: dict[str, dict[str, list[dict[str, float]]]] = {
            name: {"pipeline": [], "naive": []} for name, *_ in workloads
        }
        with Grader(workers=1) as grader:
            await grader.grade_batch([("\\boxed{5}", "5")])  # starts the grading pool before the clock does
            for rep in range(repeat):
                for name, problems, params in workloads:
                    # interleaved, so both schedules meet the same machine noise
                    t0 = time.monotonic()
                    outcomes = await rewrite_batch(problems, engine, grader, params, id_salt=f"bench{rep}")
                    t1 = time.monotonic()
                    naive = await naive_batch(problems, engine, grader, params)
                    t2 = time.monotonic()
                    runs = rewrite[name]
                    runs["pipeline"].append(
                        {
                            "seconds": t1 - t0,
                            "tokens": sum(o.generated_tokens for o in outcomes),
                            "examples": sum(len(o.examples) for o in outcomes),
                            "self": sum(o.stage is not None and o.stage.value == "self" for o in outcomes),
                            "guided": sum(o.stage is not None and o.stage.value == "guided" for o in outcomes),
                        }
                    )
                    runs["naive"].append({"seconds": t2 - t1, **naive})
                    print(f"bench rewrite {name} {rep}: {runs['pipeline'][-1]} naive {runs['naive'][-1]}", flush=True)
        result["rewrite"] = rewrite
    if spec.get("reload"):
        checkpoint = Path(spec["checkpoint"])
        files = sorted(checkpoint.glob("*.safetensors"))
        result["checkpoint_bytes"] = sum(f.stat().st_size for f in files)
        cold: list[float] = []
        warm: list[float] = []
        reads: list[float] = []
        for _ in range(repeat + 1):
            reads.append(read_seconds(files))
            drop_page_cache(files)
            t0 = time.monotonic()
            await engine.reload(str(checkpoint))
            cold.append(time.monotonic() - t0)
            t0 = time.monotonic()
            await engine.reload(str(checkpoint))  # the trainer's checkpoint is usually still in the page cache
            warm.append(time.monotonic() - t0)
            print(f"bench reload: read {reads[-1]:.2f}s cold {cold[-1]:.2f}s warm {warm[-1]:.2f}s", flush=True)
        # the first round is the warm-up
        result["reload"] = {"cold_s": cold[1:], "warm_s": warm[1:], "read_s": reads[1:]}
    await engine.shutdown()
    return result


def main(argv: Sequence[str]) -> None:
    """Entry point: KIND SPEC RESULT."""
    kind, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    if kind == "serve":
        serve(spec)
        return
    runners = {"generate": plain_generate, "engine": engine_lines}
    result = runners[kind](spec)
    _write(Path(result_path), result)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # vLLM's CPU engine may abort in interpreter teardown once the work is done


if __name__ == "__main__":
    main(sys.argv[1:])
