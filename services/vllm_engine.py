"""The Engine Protocol on vLLM's AsyncLLM, in process: sampling with log-probs, scoring, weight reload.

One `VLLMEngine` owns one AsyncLLM. Log-probs come from vLLM itself: sampled tokens carry the
log-probability of the distribution they were drawn from (`logprobs_mode="processed_logprobs"`, so
temperature and top-p are included), and `score` reads `prompt_logprobs` of prompt+completion (raw
model, temperature 1). `reload` swaps weights in place from an HF safetensors folder after checking the
folder against the checkpoint being served, because vLLM's in-place reload leaves a half-loaded model
behind when a file turns out to be bad midway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.platforms import CpuArchEnum, current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from services import vllm_version
from services.engine import (
    KV_CACHE_ENV,
    EngineStartError,
    EngineStats,
    RequestRejected,
    Sample,
    SampleStream,
    SamplingConfig,
    cpu_kv_cache_gib,
)
from shared.checkpoints import CheckpointError, CheckpointShapes, check_same_shapes, checkpoint_shapes
from shared.config import EngineConfig
from shared.model_source import resolve_model
from shared.prompts import completion_token_ids, render_prompt_ids, turn_end_ids
from shared.schema import ChatMessage

log = logging.getLogger("mindgap.engine")


class EngineBrokenError(RuntimeError):
    """vLLM failed while swapping weights in; its model is half-loaded and the process must restart."""


class VLLMEngine:
    """The mindgap Engine on an in-process vLLM AsyncLLM."""

    def __init__(self, llm: AsyncLLM, model_path: str, reference: CheckpointShapes | None) -> None:
        self._llm = llm
        self.tokenizer: Any = llm.get_tokenizer()
        self.model_path = model_path
        self.stats = EngineStats()
        self._reference = reference
        # The chat template's end-of-turn token (not necessarily EOS): sampling stops on it and expert
        # completions end with it, so sampled and expert records of this model end alike.
        self.turn_end: list[int] = turn_end_ids(self.tokenizer)
        self._in_flight = 0
        self._busy_since = 0.0
        self._reload_lock = asyncio.Lock()  # two reloads must not interleave their pause/resume

    @classmethod
    async def create(cls, cfg: EngineConfig) -> VLLMEngine:
        """Start an engine for `cfg.model` ('default', a local folder or an HF id)."""
        supported, line = vllm_version.check(vllm_version.installed_release(), vllm_version.tested_release())
        log.log(logging.INFO if supported else logging.WARNING, "%s", line)
        model = resolve_model(cfg.model)
        if current_platform.is_cpu():
            size_cpu_kv_cache(cfg.kv_cache_gib)
        args = AsyncEngineArgs(
            model=model,
            dtype=_engine_dtype(cfg.dtype),  # type: ignore[arg-type]
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,  # type: ignore[arg-type]
            enable_prefix_caching=cfg.enable_prefix_caching,
            seed=cfg.seed,
            max_num_seqs=cfg.max_num_seqs,
            enforce_eager=cfg.enforce_eager,
            logprobs_mode="processed_logprobs",
            disable_log_stats=True,
            # the weight-loading progress bar shows along with vLLM's INFO lines (-v), not in a quiet run
            use_tqdm_on_load=os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() in ("DEBUG", "INFO"),
        )
        started = time.perf_counter()
        try:
            llm = AsyncLLM.from_engine_args(args)
        except Exception as exc:  # the engine process logged its own error; this is the one line for the user
            raise EngineStartError(f"vLLM could not start {model}: {type(exc).__name__}: {exc}") from exc
        log.info("vLLM engine on %s (%s) started in %.1f s", model, args.dtype, time.perf_counter() - started)
        return cls(llm, model, _reference_shapes(model))

    @property
    def dtype(self) -> str:
        """The dtype the weights run in, as vLLM resolved it ('bfloat16', 'float32', …)."""
        return str(self._llm.model_config.dtype).removeprefix("torch.")

    def render_prompt(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of `messages` through the chat template, with the generation prompt appended."""
        return render_prompt_ids(self.tokenizer, messages)

    def encode_completion(self, text: str) -> list[int]:
        """Token ids of an assistant response written by someone else (expert), ending with the turn terminator."""
        return completion_token_ids(self.tokenizer, text, self.turn_end)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens skipped."""
        text: str = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return text

    async def generate(self, prompt_ids: Sequence[int], params: SamplingConfig) -> list[Sample]:
        """Sample `params.n` responses to one prompt, each with its tokens' sampling log-probs."""
        final = await self._run(prompt_ids, _sampling_params(params, params.n, self.turn_end))
        samples = [self._sample(out) for out in sorted(final.outputs, key=lambda o: o.index)]
        self.stats.generate_calls += 1
        return samples

    @asynccontextmanager
    async def stream(self, prompt_ids: Sequence[int], params: SamplingConfig) -> AsyncIterator[SampleStream]:
        """Sample `params.n` responses to one prompt, yielded as each finishes; leaving the context aborts the rest.

        The samples are `n` requests of one sample each rather than one request with `n`: vLLM fans an
        `n` request out into `n` engine requests anyway (sharing the prompt's cached blocks the same way),
        but holds back all of them until the last has finished.
        """
        stream = _VLLMStream(self, prompt_ids, params)
        self.stats.generate_calls += 1
        try:
            yield stream
        finally:
            await stream.close()

    def _sample(self, out: CompletionOutput) -> Sample:
        """One vLLM completion as a Sample (an aborted one holds the tokens generated before the abort)."""
        token_ids = list(out.token_ids)
        assert out.logprobs is not None, "vLLM returned no log-probs although they were requested"
        logprobs = [_logprob_of(tok, position) for tok, position in zip(token_ids, out.logprobs, strict=True)]
        self.stats.generated_tokens += len(token_ids)
        return Sample(out.text, token_ids, logprobs, out.finish_reason or "length")

    async def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        """log p(completion_ids[t] | prompt, completion_ids[:t]) under the current weights, temperature 1."""
        if not completion_ids:
            return []
        if not prompt_ids:
            raise ValueError("score needs a non-empty prompt: the first token has no log-prob otherwise")
        ids = [*prompt_ids, *completion_ids]
        # One generated token is the least vLLM runs; prompt log-probs skip the sampler, so they are
        # the raw model's whatever the temperature.
        sampling = SamplingParams(
            max_tokens=1, prompt_logprobs=0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY
        )
        final = await self._run(ids, sampling)
        assert final.prompt_logprobs is not None, "vLLM returned no prompt log-probs although they were requested"
        # prompt_logprobs[i] holds log p(ids[i] | ids[:i]); position 0 is None.
        positions = final.prompt_logprobs[len(prompt_ids) :]
        scores = [_logprob_of(tok, position) for tok, position in zip(completion_ids, positions, strict=True)]
        self.stats.scored_tokens += len(scores)
        return scores

    async def reload(self, path: str) -> None:
        """Load new weights (an HF safetensors folder); raise and keep the old weights on failure."""
        started = time.perf_counter()
        # vLLM reloads layer by layer into the live model: a bad tensor found midway leaves the model
        # half-loaded (meta tensors) and the next forward pass kills the engine, and a second reload
        # cannot repair it. So everything that can be checked without the model is checked first.
        shapes = checkpoint_shapes(Path(path))
        if self._reference is not None:
            check_same_shapes(shapes, self._reference, path)
        async with self._reload_lock:
            # Freeze in-flight requests while the weights change, then drop every cached KV block (the
            # running requests' too, which are recomputed) so nothing computed by the old weights is reused.
            await self._llm.pause_generation(mode="keep", clear_cache=False)
            try:
                try:
                    await self._llm.collective_rpc(
                        "reload_weights", kwargs={"weights_path": path, "is_checkpoint_format": True}
                    )
                except Exception as exc:
                    raise EngineBrokenError(
                        f"reloading weights from {path} failed midway ({exc}); the engine must be restarted"
                    ) from exc
                await self._llm.reset_prefix_cache(reset_running_requests=True)
            finally:
                await self._llm.resume_generation()
            if self._reference is None:
                self._reference = shapes
            self.model_path = path
        self.stats.extra["reloads"] = self.stats.extra.get("reloads", 0.0) + 1
        log.info("reloaded weights from %s in %.2f s", path, time.perf_counter() - started)

    async def shutdown(self) -> None:
        """Stop the engine-core process and release its memory."""
        self._llm.shutdown()

    async def _run(self, prompt_ids: Sequence[int], sampling: SamplingParams, request_id: str = "") -> RequestOutput:
        """Submit one request and wait for its final output, keeping the busy-time counter."""
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        try:
            final: RequestOutput | None = None
            prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
            try:
                async for output in self._llm.generate(prompt, sampling, request_id=request_id or _request_id()):
                    final = output
            except VLLMClientError as exc:  # this request only (too long, bad parameters)
                raise RequestRejected(str(exc)) from exc
            assert final is not None and final.finished, "vLLM ended a request without a final output"
            return final
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.stats.busy_seconds += time.perf_counter() - self._busy_since


class _VLLMStream:
    """The `n` one-sample requests of `VLLMEngine.stream`, yielded in the order they finish."""

    def __init__(self, engine: VLLMEngine, prompt_ids: Sequence[int], params: SamplingConfig) -> None:
        self._engine = engine
        sampling = _sampling_params(params, 1, engine.turn_end)
        self._ids = [_request_id() for _ in range(params.n)]
        # Each request's task lands in `_done` when it ends, so the iteration takes them as they finish.
        self._done: asyncio.Queue[asyncio.Task[RequestOutput]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(engine._run(prompt_ids, sampling, rid)) for rid in self._ids]
        for task in self._tasks:
            task.add_done_callback(self._done.put_nowait)
        self._taken: set[asyncio.Task[RequestOutput]] = set()  # yielded, or returned by `abort`

    def __aiter__(self) -> AsyncIterator[Sample]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Sample]:
        while len(self._taken) < len(self._tasks):
            task = await self._done.get()
            if task in self._taken:  # already returned by `abort`
                continue
            self._taken.add(task)
            yield self._engine._sample(task.result().outputs[0])  # a refused request raises here

    async def abort(self) -> list[Sample]:
        """Abort the running requests; every sample not yet yielded, the aborted ones with their tokens so far."""
        running = [rid for rid, task in zip(self._ids, self._tasks, strict=True) if not task.done()]
        if running:
            # Aborted by their own ids (not by cancelling the tasks), each request still ends with a final
            # output: vLLM's abort output, holding the tokens generated so far.
            await self._engine._llm.abort(running)
        if self._tasks:
            await asyncio.wait(self._tasks)
        rest = [task for task in self._tasks if task not in self._taken]
        self._taken.update(rest)
        return [self._engine._sample(task.result().outputs[0]) for task in rest if task.exception() is None]

    async def close(self) -> None:
        """Cancel whatever still runs (vLLM aborts a request whose consumer is cancelled) and wait for it."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _request_id() -> str:
    return f"mg-{uuid.uuid4().hex}"


def _sampling_params(params: SamplingConfig, n: int, stop_token_ids: list[int]) -> SamplingParams:
    """vLLM's sampling parameters for `n` samples of `params`, with the sampled tokens' log-probs, final output only."""
    return SamplingParams(
        n=n,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        stop=list(params.stop) or None,
        stop_token_ids=stop_token_ids,  # vLLM also stops on the model's EOS; the stop token is kept in the output
        logprobs=0,  # 0 = only the sampled token's own log-prob
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def _engine_dtype(dtype: str) -> str:
    """`dtype`, except that 'auto' means float32 on an x86 CPU without native bfloat16.

    vLLM's 'auto' runs float32 and bfloat16 checkpoints in bfloat16 on CPU, which x86 without
    AVX512-BF16/AMX only emulates: matmuls there run about 2.5x slower than in float32.
    """
    if dtype != "auto" or not current_platform.is_cpu():
        return dtype
    if current_platform.get_cpu_architecture() != CpuArchEnum.X86:
        return dtype
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return dtype if native_bf16 else "float32"


def size_cpu_kv_cache(configured: float | None) -> int:
    """Size vLLM's CPU KV cache (`cpu_kv_cache_gib`) in VLLM_CPU_KVCACHE_SPACE, read when the engine starts; GiB.

    An explicit size also spares the start from vLLM's check that `gpu_memory_utilization` of all the
    machine's memory is free.
    """
    gib, source = cpu_kv_cache_gib(configured, os.environ.get(KV_CACHE_ENV), psutil.virtual_memory().available)
    os.environ[KV_CACHE_ENV] = str(gib)
    log.info("vLLM CPU KV cache: %d GiB (%s)", gib, source)
    return gib


def _logprob_of(token: int, position: dict[int, Logprob] | None) -> float:
    """The log-prob vLLM reported for `token` at one position (it always includes the actual token)."""
    if position is None or token not in position:
        raise RuntimeError(f"vLLM reported no log-prob for token {token}")
    return position[token].logprob


def _reference_shapes(model: str) -> CheckpointShapes | None:
    """Shapes of the checkpoint the engine started from, which every reload must match."""
    folder = Path(model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.safetensors*"]))
        except Exception:
            log.warning("no local safetensors for %s: reloads are checked for completeness only", model)
            return None
    try:
        return checkpoint_shapes(folder)
    except CheckpointError as exc:
        log.warning("cannot read the served checkpoint's shapes (%s): reloads are checked for completeness only", exc)
        return None
