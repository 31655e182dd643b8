"""The trials table: one row per trial, read from the trials' own `trial.json` records.

Rows are built from the run directory alone (no Ray), so `tune.sensitivity` and the reports work
on a copied results folder. A row is

    {trial_id, experiment, status, step, params: {name: value}, design, metrics: {name: value}}

with the metrics of the trial's last held-out evaluation. `status` is complete (reached
train.max_steps), stopped (ASHA ended it earlier), error, or running (the sweep was interrupted).
`trials.jsonl` holds the rows as they are; `trials.csv` flattens them (params and metrics as
columns, `param:` prefixed) for spreadsheets and pandas.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable


def collect(root: str | Path, max_steps: int, finished: bool = True) -> list[dict[str, Any]]:
    """Rows of every trial under ROOT/trials; `finished`: the experiment is over (running → stopped)."""
    rows = []
    for path in sorted(Path(root).glob("trials/*/trial.json")):
        rec = json.loads(path.read_text())
        last = rec["evals"][-1] if rec["evals"] else {}
        step = int(last.get("step", 0))
        status = rec["status"]
        if status == "complete" and max_steps > 0 and step < max_steps:
            status = "stopped"
        elif status == "running" and finished:
            status = "complete" if max_steps > 0 and step >= max_steps else "stopped"
        rows.append({"trial_id": rec["trial_id"], "experiment": rec["experiment"], "status": status, "step": step,
                     "params": rec["params"], "design": rec["design"],
                     "metrics": {k: v for k, v in last.items() if k != "step"},
                     "error": (rec.get("error") or "").splitlines()[0] if rec.get("error") else None})
    return rows


def write(root: str | Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    root = Path(root)
    jl, cs = root / "trials.jsonl", root / "trials.csv"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = _keys(r["params"] for r in rows)
    metrics = _keys(r["metrics"] for r in rows)
    with cs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "experiment", "status", "step"] + [f"param:{p}" for p in params] + metrics + ["error"])
        for r in rows:
            w.writerow([r["trial_id"], r["experiment"], r["status"], r["step"]]
                       + [r["params"].get(p, "") for p in params] + [r["metrics"].get(m, "") for m in metrics]
                       + [r["error"] or ""])
    return jl, cs


def read(root: str | Path) -> list[dict[str, Any]]:
    path = Path(root) / "trials.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: --results must be a sweep's run.dir (python -m tune.sweep writes it)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no trials")
    return rows


def best(rows: list[dict[str, Any]], metric: str = "objective") -> dict[str, Any] | None:
    """The complete trial with the highest `metric` (None if none completed)."""
    done = [r for r in rows if r["status"] == "complete" and metric in r["metrics"]]
    return max(done, key=lambda r: r["metrics"][metric]) if done else None


def _keys(dicts: Iterable[dict]) -> list[str]:
    out: dict[str, None] = {}
    for d in dicts:
        out.update(dict.fromkeys(d))
    return list(out)
