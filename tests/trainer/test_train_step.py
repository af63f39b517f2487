"""One `train_step` on one in-process rank: importance weights and the per-stage gap metrics of a real step.

The DeepSpeed engine is replaced by the few methods `train_step` calls, on the tiny policy with a zero
learning rate, so every micro-batch sees the weights the samples were drawn from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as torch_dist

from shared.prompts import render_prompt_ids
from shared.schema import ChatMessage
from tests.support.sampling import draw
from trainer.config import TrainerConfig
from trainer.data import TrainItem
from trainer.losses import LossSpec
from trainer.train import train_step
from trainer.zero import Dist


class OneRankEngine:
    """What `train_step` uses of a DeepSpeed engine, on a plain module (SGD, learning rate 0)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.0)

    def __call__(self, **inputs: Any) -> Any:
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def zero_optimization(self) -> bool:
        return False

    def bfloat16_enabled(self) -> bool:
        return False

    def get_global_grad_norm(self) -> None:
        return None

    def get_lr(self) -> list[float]:
        return [0.0]


@pytest.fixture
def one_rank() -> Iterator[Dist]:
    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        yield Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    finally:
        torch_dist.destroy_process_group()


def test_step_reports_weight_one_and_the_gap_per_stage(tiny_model_dir: Path, one_rank: Dist) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompt = render_prompt_ids(tokenizer, [ChatMessage(role="user", content="What is two plus three?")])
    completions, behaviour = draw(model, prompt, 0.7, 0.9, n=6, length=10)
    items = [
        TrainItem(f"s{i}", str(i), prompt + c, len(prompt), b, 0, "self", temperature=0.7, top_p=0.9)
        for i, (c, b) in enumerate(zip(completions, behaviour, strict=True))
    ]
    expert = prompt + tokenizer("two plus three is five", add_special_tokens=False)["input_ids"]
    items += [TrainItem("e", "e", expert, len(prompt), None, 0, "expert")] * 2
    cfg = TrainerConfig(batch_size=8, micro_batch_size=2)
    stats = train_step(OneRankEngine(model), None, items, one_rank, cfg, LossSpec("is", is_level="sequence"), 0)

    # the policy's own samples, at their sampling temperature: every sequence weight is 1
    assert stats["is_weight_mean"] == pytest.approx(1.0, abs=1e-4) and stats["is_ess"] == pytest.approx(1.0)
    assert stats["is_clip_frac"] == 0.0
    assert stats["gap/self/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert stats["gap/self/is_seq_ratio_ess"] == pytest.approx(1.0, abs=1e-6)
    assert "gap/expert/nll" in stats and "gap/expert/is_ratio_mean" not in stats and "gap/guided/nll" not in stats
    # the stages' NLLs are the step's NLL split by stage
    self_tokens, expert_tokens = 6 * 10, 2 * (len(expert) - len(prompt))
    mixed = (stats["gap/self/nll"] * self_tokens + stats["gap/expert/nll"] * expert_tokens) / (
        self_tokens + expert_tokens
    )
    assert mixed == pytest.approx(stats["nll"], rel=1e-6)
    assert 0.0 <= stats["gap/self/share_below_p"] <= 1.0


class ClipRecordingEngine(OneRankEngine):
    """Records the gradient norm the optimizer would apply, i.e. after any clipping."""

    def __init__(self, module: Any) -> None:
        super().__init__(module)
        self.applied: list[float] = []

    def step(self) -> None:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if grads:
            self.applied.append(float(torch.nn.utils.get_total_norm(grads)))
        super().step()


@pytest.mark.parametrize("grad_clip", [1e-4, 0.0])
def test_fp32_stage0_step_measures_then_clips_the_gradient(
    tiny_model_dir: Path, one_rank: Dist, grad_clip: float
) -> None:
    """fp32 at stage 0 the loop clips (DeepSpeed's clip is off): the reported norm is the raw one, the
    optimizer sees it scaled to `grad_clip`; with clipping off it sees the raw gradient."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompt = render_prompt_ids(tokenizer, [ChatMessage(role="user", content="What is two plus three?")])
    expert = prompt + tokenizer("two plus three is five", add_special_tokens=False)["input_ids"]
    items = [TrainItem(f"e{i}", str(i), expert, len(prompt), None, 0, "expert") for i in range(2)]
    cfg = TrainerConfig(batch_size=2, micro_batch_size=2, precision="fp32", zero_stage=2, grad_clip=grad_clip)
    engine = ClipRecordingEngine(model)
    stats = train_step(engine, None, items, one_rank, cfg, LossSpec("sft"), 0)

    assert stats["grad_norm"] > 1e-3  # measured before the clip
    expected = grad_clip if grad_clip > 0 else stats["grad_norm"]
    assert engine.applied == [pytest.approx(expected, rel=1e-3)]
