"""Ablations: does each part of the method beat its simpler alternative, beyond seed noise?

    python -m tune.ablate --config configs/ablate-tiny.yaml [--set ablate.seeds=[0,1,2] ...]

Factors (any subset, any levels; the first level of each is its baseline):
    stw      stw.mode             none | static | dynamic
    loss     loss.kind            infonce (one InfoNCE for every task) | dle (the full per-task mixes)
    pooling  model.pooling.kind   mean | last | attention | multihead
or any training-config path. Every cell of the factorial design is trained once per seed (a Ray
Tune trial each, `max_concurrent` at a time, resumable like a sweep) and scored on the held-out
shards. run.dir gets trials.csv/jsonl and report.md with mean ± std over seeds per cell, per task and
per language, and one verdict line per factor level:

    Δ = mean_k (y(level, rest_k) − y(baseline, rest_k))

over the pairs k of runs that share every other factor and the seed (pairing removes the seed's
share of the noise), with σ = std_k / √n the standard error of Δ. |Δ| ≥ 2σ is called an effect,
|Δ| < 2σ "within noise"; with one pair there is no σ and the verdict says so.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tune import plots, results
from tune.config import Harness
from tune.runner import build_inits, fixed_points, interrupted, start_ray, open_harness, run_experiment
from tune.space import apply_params
from tune.trial import Job
from vipoly.config import Config, ConfigError
from vipoly.tasks import LANGS, TASKS


def cells(harness: Harness) -> list[dict[str, Any]]:
    """Tune points: one per (cell, seed), tagged `_design` = ["cell", {factor: level}, seed]."""
    a = harness.ablate
    paths = a.paths()
    factors = list(a.factors)
    out = []
    for levels in itertools.product(*(a.factors[f] for f in factors)):
        cell = dict(zip(factors, levels))
        for seed in a.seeds:
            point = {paths[f]: level for f, level in cell.items()}
            point["train.seed"] = seed
            point["_design"] = ["cell", cell, seed]
            out.append(point)
    return out


def check(harness: Harness, cfg: Config) -> None:
    """Every cell must make a valid training config: fail before anything trains."""
    if "train.seed" in harness.ablate.paths().values():
        raise ConfigError("ablate.factors: vary the seed with ablate.seeds, not as a factor")
    for point in cells(harness):
        apply_params(cfg, {k: v for k, v in point.items() if not k.startswith("_")})


def _cell_name(cell: dict[str, Any]) -> str:
    return ", ".join(f"{f}={v}" for f, v in cell.items())


def verdicts(rows: list[dict], factors: dict[str, list], key: str = "objective") -> list[dict[str, Any]]:
    """One comparison per non-baseline level of each factor: paired Δ, its σ, n pairs, verdict."""
    by = {}
    for r in rows:
        _, cell, seed = r["design"]
        by[(tuple(sorted((f, str(v)) for f, v in cell.items())), seed)] = r["metrics"][key]
    out = []
    for factor, levels in factors.items():
        base = str(levels[0])
        for level in map(str, levels[1:]):
            diffs = []
            for (cell, seed), y in by.items():
                c = dict(cell)
                if c.get(factor) != level:
                    continue
                twin = (tuple(sorted({**c, factor: base}.items())), seed)
                if twin in by:
                    diffs.append(y - by[twin])
            d = np.array(diffs)
            n = len(d)
            delta = float(d.mean()) if n else float("nan")
            sigma = float(d.std(ddof=1) / np.sqrt(n)) if n >= 2 else float("nan")
            if n == 0:
                text = "no complete pair of runs to compare"
            elif n == 1:
                text = "1 pair: no noise estimate (add seeds)"
            elif abs(delta) >= 2 * sigma:
                text = f"{'better' if delta > 0 else 'worse'} beyond noise (|Δ| ≥ 2σ, σ = {sigma:.3f})"
            else:
                text = f"within noise (|Δ| < 2σ, σ = {sigma:.3f})"
            out.append({"factor": factor, "level": level, "baseline": base, "delta": delta, "sigma": sigma,
                        "pairs": n, "verdict": text})
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.array(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def write_report(root: Path, harness: Harness, rows: list[dict]) -> Path:
    metric, objective = harness.heldout.metric, harness.heldout.objective
    done = [r for r in rows if r["experiment"] == "ablate" and r["status"] == "complete"]
    factors = harness.ablate.factors
    seeds = harness.ablate.seeds
    groups: dict[str, list[dict]] = {}
    for r in done:
        groups.setdefault(_cell_name(r["design"][1]), []).append(r)
    failed = [r for r in rows if r["experiment"] == "ablate" and r["status"] != "complete"]
    lines = [f"# Ablation report — {root.name}", "",
             f"Factors: {'; '.join(f'{f} ({harness.ablate.paths()[f]}): ' + ', '.join(map(str, v)) for f, v in factors.items())}. "
             f"Seeds: {seeds}. Objective: {objective} {metric} over tasks on held-out data ({harness.heldout.root}). "
             f"{len(done)} runs complete" + (f", {len(failed)} not ({', '.join(r['trial_id'] for r in failed)})" if failed else "")
             + ".", "", "## Verdicts", ""]
    vs = verdicts(done, factors)
    for v in vs:
        delta = "n/a" if not np.isfinite(v["delta"]) else f"{v['delta']:+.3f}"
        lines.append(f"- {v['factor']} {v['level']} vs {v['baseline']}: {delta} {objective} {metric} "
                     f"over {v['pairs']} paired run(s), {v['verdict']}")
    tasks = [t for t in TASKS if any(f"heldout/{t}/{metric}" in r["metrics"] for r in done)]
    langs = [lg for lg in LANGS if any(f"heldout/lang/{lg}" in r["metrics"] for r in done)]
    for title, keys in (("per task", [("objective", "objective")] + [(t, f"heldout/{t}/{metric}") for t in tasks]),
                        ("per language (mean over tasks)", [(lg, f"heldout/lang/{lg}") for lg in langs])):
        lines += ["", f"## {metric} {title}: mean ± std over seeds", "",
                  "| cell | runs | " + " | ".join(k for k, _ in keys) + " |", "|---|---|" + "---|" * len(keys)]
        for name, rs in groups.items():
            cells_ = []
            for _, key in keys:
                vals = [r["metrics"][key] for r in rs if key in r["metrics"]]
                cells_.append("—" if not vals else "{:.3f} ± {:.3f}".format(*_mean_std(vals)))
            lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells_) + " |")
    plots_dir = root / "plots"
    plots_dir.mkdir(exist_ok=True)
    if groups:
        for fname, keys, what in (("per_task.png", [("objective", "objective")] + [(t, f"heldout/{t}/{metric}") for t in tasks], "task"),
                                  ("per_language.png", [(lg, f"heldout/lang/{lg}") for lg in langs], "language")):
            if not keys:
                continue
            series = {}
            for name, rs in groups.items():
                stats = [_mean_std([r["metrics"].get(k, np.nan) for r in rs]) for _, k in keys]
                series[name] = ([m for m, _ in stats], [s for _, s in stats])
            plots.grouped_bars([k for k, _ in keys], series, metric, f"{metric} per {what}: mean ± std over seeds",
                               plots_dir / fname)
            lines += ["", f"![per {what}](plots/{fname})"]
    lines += ["", "Δ pairs runs that differ only in the factor (same other levels, same seed); σ is the standard "
              "error of the mean paired difference. The tiny CPU model shows the harness, not the method's merit.", ""]
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    opened = open_harness("python -m tune.ablate", __doc__, argv, "ablate", check)
    if opened is None:
        return 2
    harness, cfg, root = opened
    points = cells(harness)
    a = harness.ablate
    print(f"vipoly ablate → {root}: {len(points) // len(a.seeds)} cells × {len(a.seeds)} seeds", flush=True)

    start_ray(cfg, a.max_concurrent, a.trial_resources.get("CPU", 0.0))
    inits = build_inits(cfg, root, a.seeds)
    grid = run_experiment(Job.of(harness, cfg, root, "ablate", inits), param_space=fixed_points(points),
                          max_concurrent=a.max_concurrent, resources=a.trial_resources)
    if interrupted(grid):
        print(f"ablation interrupted: re-run the same command to resume it ({root / 'ablate'})", file=sys.stderr)
        return 1
    rows = results.collect(root, cfg.train.max_steps)
    results.write(root, rows)
    report = write_report(root, harness, rows)
    print(f"ablation report → {report}", flush=True)
    print(report.read_text().split("## Verdicts", 1)[1].split("\n## ")[0].strip(), flush=True)
    return 0 if all(r["status"] == "complete" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
