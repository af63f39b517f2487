"""The policy-gap report behind `mindgap gap`: how off-policy a dataset's responses are for a model.

Every response is scored by the model on the *training* context — the plain solve prompt through the
chat template, exactly what the trainer will train on — giving per-token log-probabilities
`log π(y_t | prompt(q), y_<t)` at temperature 1. Two inputs are understood:

- a problems file (raw data): each problem's expert solution (else its bare answer, as the pipeline's
  expert fallback does) is tokenized with `engine.encode_completion` and scored; its stage is `expert`;
- a records file (`mindgap rewrite` output): each record's own `completion_token_ids` are scored again
  (`rescore`, the default, so two datasets are measured with the same weights), or its stored
  `target_logprobs` are reused when they were made by the same model (records written without
  scoring have none: they must be rescored).

From those: the token log-prob histogram, mean token NLL, share of tokens with p < 0.1, and two kinds of
sequence weights, kept apart because they answer different questions:

- `behavior_ratio` — only for records that carry `behavior_logprobs` (stages self and guided):
  log w = Σ_t (sampled_t − behavior_t), the sequence importance ratio the trainer's IS loss uses, with
  `sampled_t` the model's log-prob under the record's own sampling distribution (logits / temperature,
  then its top-p nucleus), computed by the trainer's own code (`sampled_logprobs`, transformers), since
  vLLM's prompt log-probs exist at temperature 1 only. A record sampled at temperature 1 without top-p,
  or a schema-1 record (no `sampling`), uses `target_t`. So the policy's own samples weigh 1.
- `deterministic_behavior` — for every response, expert ones included, whose behaviour policy is
  unknown: the writer is treated as a deterministic policy (probability 1 for the text it wrote), so
  log w = Σ_t target_t, the response's log-probability under the model. Its per-token mean (the log of
  the geometric-mean token probability, the DFT view of the data) is reported too, since whole-sequence
  sums of a few hundred tokens spread over hundreds of nats and leave an ESS of about 1/n.

Both come with the normalised ESS `(Σw)² / (n Σw²)`, per dataset and per stage.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mindgap.evaluation import estimators as stats
from services.engine import Engine
from shared.config import EngineConfig, MindgapSettings
from shared.dataio import DataError, FieldMap, iter_rows, parse_field_specs, read_examples, read_problems
from shared.model_source import resolve_model
from shared.prompts import solve_messages
from shared.schema import Example, Problem, Stage

log = logging.getLogger("mindgap.gap")

DataKind = Literal["problems", "records"]
STAGE_ORDER = [s.value for s in Stage]


@dataclass(frozen=True)
class Scored:
    """One response's per-token log-probs under the report's model, and under its behaviour policy if known.

    `sampled`: the model's log-probs under the response's sampling distribution, the policy side of the
    importance ratio (None where there is no behaviour, or it could not be computed: `--no-rescore`).
    """

    stage: str
    target: list[float]
    behavior: list[float] | None = None
    sampled: list[float] | None = None


# -------------------------------------------------------------------------------------------- loading


def detect_kind(path: Path, split: str | None = None) -> DataKind:
    """`records` when the first readable row is an example record (has completion_token_ids), else `problems`."""
    for _, row in iter_rows(path, split):
        if isinstance(row, dict):
            return "records" if "completion_token_ids" in row else "problems"
    raise DataError(f"{path}: no readable row")


def load_records(path: Path, limit: int | None = None) -> list[Example]:
    """Example records of a file; bad rows are logged and skipped, a file without a good one is an error."""
    examples: list[Example] = []
    bad = 0
    for line, item in read_examples(path):
        if isinstance(item, Exception):
            bad += 1
            log.warning("%s:%d: not an example record (%s), row skipped", path, line, str(item).splitlines()[0])
            continue
        examples.append(item)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no valid example record ({bad} bad rows)")
    return examples


def load_raw(path: Path, fields: FieldMap | None, limit: int | None = None, split: str | None = None) -> list[Problem]:
    """Problems that have an expert demonstration (a solution, else an answer) to score."""
    result = read_problems(path, fields, limit=limit, split=split)
    for err in result.errors:
        log.warning("%s:%d: %s, row skipped", path, err.line, err.message)
    problems = [p for p in result.problems if p.solution or p.answer]
    if not problems:
        raise DataError(f"{path}: no problem with a solution or answer to score")
    return problems


# -------------------------------------------------------------------------------------------- scoring


async def _gather_chunked(calls: Sequence[Any], chunk: int) -> list[list[float]]:
    out: list[list[float]] = []
    for i in range(0, len(calls), chunk):
        out.extend(await asyncio.gather(*calls[i : i + chunk]))
    return out


async def score_problems(engine: Engine, problems: Sequence[Problem], chunk: int = 256) -> list[Scored]:
    """Score each problem's expert demonstration on the training prompt (stage `expert`)."""
    pairs = [
        (engine.render_prompt(solve_messages(p.question)), engine.encode_completion(p.solution or p.answer or ""))
        for p in problems
    ]
    scores = await _gather_chunked([engine.score(prompt, completion) for prompt, completion in pairs], chunk)
    return [Scored(Stage.EXPERT.value, s) for s in scores]


async def score_records(
    engine: Engine | None, examples: Sequence[Example], rescore: bool = True, chunk: int = 256
) -> list[Scored]:
    """Each record's completion tokens scored on its training prompt (or its stored target log-probs)."""
    if rescore:
        if engine is None:
            raise ValueError("rescoring needs an engine")
        calls = [engine.score(engine.render_prompt(ex.prompt), ex.completion_token_ids) for ex in examples]
        targets = await _gather_chunked(calls, chunk)
    else:
        missing = [ex.id for ex in examples if ex.target_logprobs is None]
        if missing:
            raise DataError(
                f"{len(missing)} records have no target_logprobs (scoring was off when they were written, e.g."
                f" {missing[0]}): rescore them (drop --no-rescore)"
            )
        targets = [ex.target_logprobs or [] for ex in examples]
    return [
        Scored(ex.stage.value, list(t), ex.behavior_logprobs, list(t) if _at_temperature_one(ex) else None)
        for ex, t in zip(examples, targets, strict=True)
    ]


def _at_temperature_one(ex: Example) -> bool:
    """Whether a record with behaviour log-probs was sampled from the plain temperature-1 distribution."""
    s = ex.sampling
    return ex.behavior_logprobs is not None and (s is None or (s.temperature == 1.0 and s.top_p >= 1.0))


def needs_sampled(ex: Example) -> bool:
    """Whether a record's importance ratio needs the model at its sampling temperature / top-p."""
    return ex.behavior_logprobs is not None and not _at_temperature_one(ex)


def sampled_logprobs(model: str, examples: Sequence[Example], batch_size: int = 4) -> list[list[float]]:
    """Each record's completion log-probs under `model` at the record's sampling temperature and top-p.

    The trainer's own code on the training prompt (`trainer.data.prepare_item`, `collate`,
    `trainer.losses.sampling_logprobs`), in float32 with transformers: the ratio of the report is the ratio
    the IS loss takes. Run after the vLLM engine is shut down, so the two never share an accelerator.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data import collate, prepare_item
    from trainer.losses import next_token_logprobs, sampling_logprobs

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    net = net.to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_len = int(getattr(net.config, "max_position_embeddings", 1 << 20))
    out: list[list[float]] = []
    for i in range(0, len(examples), batch_size):
        try:
            items = [prepare_item(ex, tokenizer, max_len, ex.id) for ex in examples[i : i + batch_size]]
        except ValueError as exc:
            raise DataError(f"a record cannot be scored by {model}: {exc}") from exc
        b = collate(items, pad).to(device)
        with torch.no_grad():
            logits = net(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            logp = next_token_logprobs(logits, b.targets)
            lp = sampling_logprobs(logits, logp, b.targets, b.mask, b.temperature, b.top_p, b.has_behavior)
        out.extend(row[m > 0].tolist() for row, m in zip(lp.cpu(), b.mask.cpu(), strict=True))
    return out


# ---------------------------------------------------------------------------------------- statistics


def _weights(log_weights: list[float], lengths: list[int]) -> dict[str, Any]:
    per_token = [w / n for w, n in zip(log_weights, lengths, strict=True)]
    return {
        "sequence": stats.as_json(stats.weight_stats(log_weights)),
        "per_token_mean": stats.as_json(stats.weight_stats(per_token)),
    }


def summarise(seqs: Sequence[Scored]) -> dict[str, Any]:
    """Token statistics and both kinds of sequence weights for a group of scored responses."""
    seqs = [s for s in seqs if s.target]
    out: dict[str, Any] = {"tokens": stats.as_json(stats.token_stats([s.target for s in seqs]))}
    lengths = [len(s.target) for s in seqs]
    out["deterministic_behavior"] = _weights([sum(s.target) for s in seqs], lengths)
    with_behavior = [s for s in seqs if s.behavior is not None and s.sampled is not None]
    out["behavior_ratio"] = (
        _weights(
            [stats.sequence_log_ratio(s.sampled or [], s.behavior or []) for s in with_behavior],
            [len(s.target) for s in with_behavior],
        )
        if with_behavior
        else None
    )
    # records with behaviour log-probs whose ratio needs the model at their sampling temperature, which
    # stored (temperature-1) target log-probs cannot give: left out of behavior_ratio, counted here
    out["ratio_unavailable"] = sum(1 for s in seqs if s.behavior is not None and s.sampled is None)
    return out


def dataset_report(name: str, path: Path, kind: DataKind, seqs: Sequence[Scored]) -> dict[str, Any]:
    """One dataset's section: everything together, then per stage (in self, guided, expert order)."""
    if not any(s.target for s in seqs):
        raise DataError(f"{name}: nothing to report (no scored tokens)")
    stages = sorted({s.stage for s in seqs}, key=STAGE_ORDER.index)
    by_stage = {st: [s for s in seqs if s.stage == st] for st in stages}
    return {
        "name": name,
        "path": str(path),
        "kind": kind,
        "stage_counts": {st: len(v) for st, v in by_stage.items()},
        "all": summarise(seqs),
        "by_stage": {st: summarise(v) for st, v in by_stage.items() if any(s.target for s in v)},
    }


DEFINITIONS = {
    "token_logprob": "log π(y_t | prompt(q), y_<t) under the model, temperature 1, training prompt (chat template)",
    "mean_nll": "−mean token log-prob over all tokens; mean_sequence_nll averages per-sequence means",
    "share_below_p": f"share of tokens with probability below {stats.LOW_PROB}",
    "behavior_ratio": (
        "records with behavior_logprobs only: log w = Σ_t (sampled_t − behavior_t), sampled_t the model's log-prob"
        " under the record's sampling temperature and top-p (the trainer's IS ratio; 1 on the policy's own samples)"
    ),
    "ratio_unavailable": "records left out of behavior_ratio: sampled at T≠1 or top-p<1 and not rescored",
    "deterministic_behavior": (
        "every response, expert included: the writer is taken as deterministic (p = 1 for its text), "
        "so log w = Σ_t target_t; per_token_mean divides by the length (log geometric-mean token probability)"
    ),
    "ess": "normalised effective sample size (Σw)² / (n Σw²) of the weights exp(log w), in [1/n, 1]",
}


def gap_report(model: str, datasets: Sequence[dict[str, Any]], rescored: bool) -> dict[str, Any]:
    """The whole JSON report: settings, definitions, histogram bin edges and one section per dataset."""
    return {
        "model": model,
        "rescored": rescored,
        "definitions": DEFINITIONS,
        "histogram_edges": stats.histogram_edges(),
        "datasets": list(datasets),
    }


# -------------------------------------------------------------------------------------------- output


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def markdown(rep: dict[str, Any]) -> str:
    """One table row per dataset and stage: token statistics, then the two weight families with their ESS."""
    lines = [
        f"Model `{rep['model']}`, responses scored on the training prompt"
        + (" (rescored)." if rep["rescored"] else " (stored target log-probs)."),
        "",
        "| data | stage | responses | tokens | mean NLL | p<0.1 | median log p | ESS seq (det.) "
        "| ESS per-token (det.) | log-ratio mean ± std | ESS seq (IS) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in rep["datasets"]:
        sections = [("all", d["all"])] + (list(d["by_stage"].items()) if len(d["by_stage"]) > 1 else [])
        for stage, s in sections:
            t, det, ratio = s["tokens"], s["deterministic_behavior"], s["behavior_ratio"]
            seq = ratio["sequence"] if ratio else None
            ratio_cells = f"{_f(seq['mean'], 2)} ± {_f(seq['std'], 2)} | {_f(seq['ess'])}" if seq else "– | –"
            label = stage if stage != "all" else ("all" if len(d["by_stage"]) > 1 else next(iter(d["by_stage"])))
            lines.append(
                f"| {d['name']} | {label} | {t['sequences']} | {t['tokens']} | {_f(t['mean_nll'])} "
                f"| {_f(t['share_below_p'])} | {_f(t['quantiles']['p50'])} | {_f(det['sequence']['ess'])} "
                f"| {_f(det['per_token_mean']['ess'])} | {ratio_cells} |"
            )
    lines += ["", "Definitions:", ""] + [f"- `{k}`: {v}" for k, v in rep["definitions"].items()]
    return "\n".join(lines) + "\n"


def write_png(groups: Sequence[tuple[str, Sequence[Scored]]], path: Path) -> None:
    """Token log-prob histograms (density) per dataset and stage, and per-sequence mean log-prob histograms."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    import numpy as np

    edges = np.asarray(stats.histogram_edges())
    fig, (ax_tok, ax_seq) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, seqs in groups:
        stages = sorted({s.stage for s in seqs}, key=STAGE_ORDER.index)
        splits = [(name, list(seqs))] + (
            [(f"{name}/{st}", [s for s in seqs if s.stage == st]) for st in stages] if len(stages) > 1 else []
        )
        for label, part in splits:
            tokens = [x for s in part for x in s.target]
            if not tokens:
                continue
            style = "-" if label == name else ":"
            clipped = np.clip(tokens, edges[0], edges[-1])
            ax_tok.hist(
                clipped, bins=edges, density=True, histtype="step", linestyle=style, label=f"{label} ({len(part)})"
            )
            means = [sum(s.target) / len(s.target) for s in part if s.target]
            ax_seq.hist(means, bins=30, density=True, histtype="step", linestyle=style, label=label)
    ax_tok.set(xlabel="token log-prob under the model", ylabel="density", yscale="log", title="per-token log p")
    ax_tok.axvline(np.log(stats.LOW_PROB), color="grey", linewidth=0.8)
    ax_seq.set(xlabel="per-token mean log-prob of a response", ylabel="density", title="per-sequence mean log p")
    ax_tok.legend(fontsize=8)
    ax_seq.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rep: dict[str, Any], groups: Sequence[tuple[str, Sequence[Scored]]], out_dir: Path) -> list[Path]:
    """Write gap.json, gap.md and gap.png into `out_dir`; the paths written."""
    from shared.dataio import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "gap.json", out_dir / "gap.md", out_dir / "gap.png"]
    atomic_write_text(paths[0], json.dumps(rep, indent=2) + "\n")
    atomic_write_text(paths[1], markdown(rep))
    write_png(groups, paths[2])
    return paths


# ------------------------------------------------------------------------------------------- the run


class GapConfig(MindgapSettings):
    """Everything one `mindgap gap` process needs (TOML file, MINDGAP_… env, CLI flags)."""

    inputs: list[Path] = Field(min_length=1, max_length=2)
    output_dir: Path
    labels: list[str] = Field(default_factory=list, description="dataset names (default: file stems)")
    fields: list[str] = Field(default_factory=list, description="field mapping for problems files")
    limit: int | None = Field(None, ge=1, description="first N problems or records of each file")
    split: str | None = Field(None, description="split of HF datasets folders and hub ids (default: train)")
    rescore: bool = Field(
        True,
        description="score records again instead of reusing their target_logprobs; also what computes the"
        " importance ratio of records sampled at a temperature other than 1",
    )
    chunk_size: int = Field(256, ge=1, description="scoring requests sent to the engine at once")
    backend: Literal["vllm", "fake"] = "vllm"
    engine: EngineConfig = Field(default_factory=EngineConfig)

    def needs_engine(self) -> bool:
        """Whether any input must be scored: every problems file, and records unless reusing their log-probs."""
        return self.rescore or any(detect_kind(p, self.split) == "problems" for p in self.inputs)

    def names(self) -> list[str]:
        """One distinct name per input."""
        if self.labels:
            if len(self.labels) != len(self.inputs):
                raise ValueError(f"{len(self.labels)} labels for {len(self.inputs)} inputs")
            return list(self.labels)
        stems = [p.stem for p in self.inputs]
        return stems if len(set(stems)) == len(stems) else [str(p) for p in self.inputs]


async def run_gap(cfg: GapConfig) -> dict[str, Any]:
    """Load the inputs (all errors before any engine starts), score them on one engine, write the report."""
    from services.engine import create_engine

    fields = parse_field_specs(cfg.fields) if cfg.fields else None
    loaded: list[tuple[str, Path, DataKind, list[Problem] | list[Example]]] = []
    for name, path in zip(cfg.names(), cfg.inputs, strict=True):
        kind = detect_kind(path, cfg.split)
        data = load_records(path, cfg.limit) if kind == "records" else load_raw(path, fields, cfg.limit, cfg.split)
        log.info("%s: %d %s from %s", name, len(data), kind, path)
        loaded.append((name, path, kind, data))

    engine = await create_engine(cfg.backend, cfg.engine) if cfg.needs_engine() else None
    groups: list[tuple[str, list[Scored]]] = []
    sections = []
    try:
        for name, path, kind, data in loaded:
            if kind == "problems":
                assert engine is not None
                seqs = await score_problems(engine, [p for p in data if isinstance(p, Problem)], cfg.chunk_size)
            else:
                examples = [e for e in data if isinstance(e, Example)]
                seqs = await score_records(engine, examples, cfg.rescore, cfg.chunk_size)
            groups.append((name, seqs))
            sections.append(dataset_report(name, path, kind, seqs))
    finally:
        if engine is not None:
            await engine.shutdown()
    sampled_records = [
        (name, k, ex)
        for name, _, kind, data in loaded
        if kind == "records"
        for k, ex in enumerate(data)
        if isinstance(ex, Example) and needs_sampled(ex)
    ]
    if cfg.rescore and sampled_records:
        log.info("%d records: log-probs at their sampling temperature (transformers)", len(sampled_records))
        values = sampled_logprobs(cfg.engine.model, [ex for _, _, ex in sampled_records])
        by_name = dict(groups)
        for (name, k, _), lp in zip(sampled_records, values, strict=True):
            by_name[name][k] = replace(by_name[name][k], sampled=lp)
        sections = [dataset_report(n, p, kind, by_name[n]) for n, p, kind, _ in loaded]
    rep = gap_report(cfg.engine.model, sections, rescored=cfg.rescore)
    write_outputs(rep, groups, cfg.output_dir)
    return rep
