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
import math
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.logprobs import Logprob
from vllm.outputs import RequestOutput
from vllm.platforms import CpuArchEnum, current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from services.engine import EngineStats, RequestRejected, Sample, SamplingConfig
from shared.checkpoints import CheckpointError, CheckpointShapes, check_same_shapes, checkpoint_shapes
from shared.config import EngineConfig
from shared.model_source import resolve_model
from shared.prompts import render_prompt_ids
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
        self._eos_id: int = self.tokenizer.eos_token_id
        self._in_flight = 0
        self._busy_since = 0.0
        self._reload_lock = asyncio.Lock()  # two reloads must not interleave their pause/resume

    @classmethod
    async def create(cls, cfg: EngineConfig) -> VLLMEngine:
        """Start an engine for `cfg.model` ('default', a local folder or an HF id)."""
        model = resolve_model(cfg.model)
        if current_platform.is_cpu() and cfg.kv_cache_gib is not None:
            set_cpu_kv_cache_space(cfg.kv_cache_gib)
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
        )
        started = time.perf_counter()
        llm = AsyncLLM.from_engine_args(args)
        log.info("vLLM engine on %s (%s) started in %.1f s", model, args.dtype, time.perf_counter() - started)
        return cls(llm, model, _reference_shapes(model))

    def render_prompt(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of `messages` through the chat template, with the generation prompt appended."""
        return render_prompt_ids(self.tokenizer, messages)

    def encode_completion(self, text: str) -> list[int]:
        """Token ids of an assistant response written by someone else (expert), ending with EOS."""
        # split_special_tokens: a literal "<|im_end|>" in the data stays text, as in the prompt.
        ids: list[int] = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [*ids, self._eos_id]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens skipped."""
        text: str = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return text

    async def generate(self, prompt_ids: Sequence[int], params: SamplingConfig) -> list[Sample]:
        """Sample `params.n` responses to one prompt, each with its tokens' sampling log-probs."""
        sampling = SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            logprobs=0,  # 0 = only the sampled token's own log-prob
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = await self._run(prompt_ids, sampling)
        samples = []
        for out in sorted(final.outputs, key=lambda o: o.index):
            token_ids = list(out.token_ids)
            assert out.logprobs is not None, "vLLM returned no log-probs although they were requested"
            logprobs = [_logprob_of(tok, position) for tok, position in zip(token_ids, out.logprobs, strict=True)]
            samples.append(Sample(out.text, token_ids, logprobs, out.finish_reason or "length"))
            self.stats.generated_tokens += len(token_ids)
        self.stats.generate_calls += 1
        return samples

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

    async def _run(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> RequestOutput:
        """Submit one request and wait for its final output, keeping the busy-time counter."""
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        try:
            final: RequestOutput | None = None
            prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
            try:
                async for output in self._llm.generate(prompt, sampling, request_id=f"mg-{uuid.uuid4().hex}"):
                    final = output
            except VLLMClientError as exc:  # this request only (too long, bad parameters)
                raise RequestRejected(str(exc)) from exc
            assert final is not None and final.finished, "vLLM ended a request without a final output"
            return final
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.stats.busy_seconds += time.perf_counter() - self._busy_since


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


def set_cpu_kv_cache_space(gib: float) -> None:
    """Size vLLM's CPU KV cache: VLLM_CPU_KVCACHE_SPACE, whole GiB (rounded up), read when the engine starts."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(gib)))


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
