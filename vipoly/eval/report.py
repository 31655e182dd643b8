"""Write suite results as JSON and as Markdown tables (one table per suite kind)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from vipoly.eval.suites import Result

BM25_NOTE = ("BM25 (Okapi, k1=1.5, b=0.75, word tokens; Han characters as unigrams+bigrams) is the lexical bar. "
             "A tiny model trained from scratch shows the pipeline's mechanics, not retrieval quality, "
             "which needs pretrained weights.")


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(results: Sequence[Result], meta: dict[str, Any]) -> str:
    lines = [f"# Evaluation: {meta.get('model', '')}", ""]
    for k in ("created", "task", "limit", "dim"):
        if meta.get(k) is not None:
            lines.append(f"- {k}: {meta[k]}")
    lines.append("")
    lines += tables(results, "##")
    lines.append(BM25_NOTE)
    return "\n".join(lines) + "\n"


def tables(results: Sequence[Result], heading: str = "##") -> list[str]:
    """One Markdown table per suite kind (a `heading` title each), every system a row, notes below;
    also what the model card's evaluation section shows."""
    lines: list[str] = []
    kinds: dict[str, list[Result]] = {}
    for r in results:
        kinds.setdefault(r.kind, []).append(r)
    for kind, rows in kinds.items():
        metric_names: list[str] = []
        for r in rows:
            for m in r.metrics.values():
                metric_names += [n for n in m if n not in metric_names]
        lines += [f"{heading} {kind}", "",
                  "| suite | system | queries | corpus | " + " | ".join(metric_names) + " |",
                  "|---|---|---:|---:|" + "---:|" * len(metric_names)]
        for r in rows:
            for system, m in r.metrics.items():
                cells = [_fmt(m[n]) if n in m else "" for n in metric_names]
                lines.append(f"| {r.name} | {system} | {r.n_queries} | {r.corpus_size} | " + " | ".join(cells) + " |")
        notes = [f"- {r.name}: {r.notes}" for r in rows if r.notes]
        lines += [""] + notes + ([""] if notes else [])
    return lines


def write_report(results: Sequence[Result], out: str | Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """FILE.json (meta + one record per result) and FILE.md beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out if out.suffix == ".json" else out.with_suffix(".json")
    md_path = json_path.with_suffix(".md")
    json_path.write_text(json.dumps({**meta, "results": [r.to_dict() for r in results]}, indent=2, ensure_ascii=False))
    md_path.write_text(markdown(results, meta))
    return json_path, md_path


def evaluation_markdown(results: Sequence, meta: Mapping[str, Any]) -> str:
    """The evaluation section's body from `pipelines.evaluate` results (`Result`s) and run meta."""
    facts = [f"task {meta['task']}" if meta.get("task") else "no task prefix"]
    facts += [f"{k} {meta[k]}" for k in ("limit", "dim") if meta.get(k) is not None]
    lines = [f"`python -m pipelines.evaluate` on {meta.get('created', '')} ({', '.join(facts)}). Suites: "
             + ", ".join(f"`{s}`" for s in meta.get("suites", [])) + ".", ""]
    lines += tables(results, "###")
    lines.append(BM25_NOTE)
    return "\n".join(lines)


# ---------------------------------------------------------------- read the run
