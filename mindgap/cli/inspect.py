"""`mindgap inspect DATA`: read a dataset as a job would and show how it reads — before any GPU hour is spent.

Prints the mapping the reader chose (where each field's values came from), the first problems as
question / solution / gold, and the counts: readable, ungradable, skipped with reasons. Nothing is
sampled and no engine starts; exit 0 whenever the file reads at all, 2 when it cannot be read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from mindgap.cli import app, fail

if TYPE_CHECKING:
    from shared.wire import DataPreview

SHOWN_CHARS = 600  # of each question and solution; the rest is elided


@app.command()
def inspect(
    data: str = typer.Argument(..., help="problems: JSONL, JSON, parquet, a local HF datasets folder or a hub id"),
    fields: list[str] | None = typer.Option(
        None, help="field mapping, e.g. question=problem, 'question={Body} {Question}', answer=meta.final, turn=-1"
    ),
    split: str | None = typer.Option(None, help="split of an HF datasets folder or hub dataset"),
    show: int = typer.Option(3, "--show", "-n", min=0, help="problems to print"),
    as_json: bool = typer.Option(False, "--json", help="print the preview as JSON (what a dry-run job answers)"),
) -> None:
    """Show how a dataset reads: the mapping chosen, the first problems, readable/ungradable/skipped counts."""
    from shared.dataio import DataError, parse_field_specs, preview, read_problems

    try:
        mapping = parse_field_specs(fields)
        result = read_problems(data, mapping, split=split)
    except (DataError, OSError) as exc:
        message = str(exc)
        raise fail(message if data in message else f"{data}: {message}") from None
    report = preview(result, mapping, shown=show)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    typer.echo(render(data, report))


def _clip(text: str | None) -> str:
    if text is None:
        return "—"
    text = text.strip()
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]} … ({len(text)} chars)"


def _indented(label: str, text: str) -> str:
    lines = text.splitlines() or [""]
    pad = " " * (len(label) + 2)
    return "\n".join([f"  {label}{lines[0]}", *(f"{pad}{line}" for line in lines[1:])])


def render(data: str, report: DataPreview) -> str:
    """The preview as the terminal shows it."""
    out = [f"{data}: read with {' '.join(f'{k}={v}' for k, v in report.fields.items()) or 'no mapping (auto)'}"]
    out.append("mapping (where each field came from, rows):")
    for name in ("question", "solution", "gold", "system"):
        for source, rows in report.mapping.get(name, {}).items():
            out.append(f"  {name:<9}← {source} ({rows})")
    for i, p in enumerate(report.problems, 1):
        out.append(f"\nproblem {i} (line {p.line}, id {p.id})")
        out.append(_indented("question: ", _clip(p.question)))
        out.append(_indented("solution: ", _clip(p.solution)))
        written = p.meta.get("answer_text")
        gold = "— (ungradable)" if p.answer is None else p.answer
        out.append(f"  gold:     {gold}" + (f"   (written: {written!r})" if written is not None else ""))
        if "system" in p.meta:
            out.append(_indented("system:   ", _clip(p.meta["system"])))
    out.append(
        f"\nrows {report.rows} · readable {report.readable} · ungradable {report.ungradable} (no gold answer)"
        f" · skipped {report.skipped}"
    )
    if report.skipped:
        out.append("skipped: " + ", ".join(f"{kind} ×{n}" for kind, n in report.skipped_reasons.items()))
        out.extend(f"  line {e.line}: {e.message}" for e in report.errors[:10])
    return "\n".join(out)
