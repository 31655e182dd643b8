"""The number a sweep maximises: held-out retrieval, per task, folded into one objective.

Each task of the held-out canonical shards is a retrieval problem: a query finds its positive
among all of that task's positives (`vipoly.eval.suites.Canonical`, which also splits by language).
With m_t the chosen metric (MRR@10 by default) of task t over the tasks present:

    objective = mean_t m_t        ("mean")
    objective = min_t m_t         ("worst": a weighting that starves one task scores low)

The flat metric names are what the trials table and the reports use:
    heldout/<task>/<metric>         every retrieval metric of a task (all its languages together)
    heldout/<task>/<lang>/<metric>  the chosen metric within one language
    heldout/lang/<lang>             the chosen metric's mean over tasks, within one language
    heldout/mean, heldout/worst, objective
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tune.config import HeldoutConfig


def evaluate(model_dir: str | Path, heldout: HeldoutConfig) -> dict[str, float]:
    """Load the PolyEmbedder in `model_dir` and score it on the held-out shards (flat metrics)."""
    import torch

    from vipoly.eval.suites import Canonical, Options
    from vipoly.model import PolyEmbedder

    model = PolyEmbedder.from_pretrained(model_dir, device="cuda" if torch.cuda.is_available() else None).eval()
    with torch.no_grad():
        out = Canonical(f"canonical:{heldout.root}", heldout.root).run(
            model, Options(limit=heldout.limit, batch_size=heldout.batch_size, seed=0))
    groups = {r.name: r.metrics["model"] for r in out.results}
    return flatten(groups, heldout.metric, heldout.objective)


def flatten(groups: dict[str, dict[str, float]], metric: str, objective: str) -> dict[str, float]:
    """{"task/lang" or "task/all": {metric: value}} → the flat names of the module docstring."""
    by_task: dict[str, dict[str, dict[str, float]]] = {}
    for name, metrics in groups.items():
        task, lang = name.split("/", 1)
        by_task.setdefault(task, {})[lang] = metrics
    out: dict[str, float] = {}
    per_lang: dict[str, list[float]] = {}
    for task, langs in by_task.items():
        # Canonical reports an "all" group only when a task has several languages.
        overall = langs.get("all") or next(iter(langs.values()))
        for k, v in overall.items():
            out[f"heldout/{task}/{k}"] = float(v)
        for lang, metrics in langs.items():
            if lang != "all":
                out[f"heldout/{task}/{lang}/{metric}"] = float(metrics[metric])
                per_lang.setdefault(lang, []).append(float(metrics[metric]))
    for lang, values in per_lang.items():
        out[f"heldout/lang/{lang}"] = float(np.mean(values))
    per_task = [out[f"heldout/{t}/{metric}"] for t in by_task]
    if not per_task:
        raise ValueError("held-out evaluation produced no task results")
    out["heldout/mean"] = float(np.mean(per_task))
    out["heldout/worst"] = float(np.min(per_task))
    out["objective"] = out[f"heldout/{objective}"]
    return out


def task_metrics(row: dict, metric: str) -> dict[str, float]:
    """{task: value} of one metric from a flat row."""
    from vipoly.tasks import TASKS

    return {t: row[f"heldout/{t}/{metric}"] for t in TASKS if f"heldout/{t}/{metric}" in row}
