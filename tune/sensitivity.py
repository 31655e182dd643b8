"""Which of the swept values matter: importance, curves and a plain-language summary of a sweep.

    python -m tune.sensitivity --results runs/sweep-tiny [--oat 5] [--all-trials]

Reads RESULTS/trials.jsonl (and sweep.yaml for the ranges) and writes RESULTS/report.md with
plots/ beside it:
- importance of each parameter for the objective: fANOVA (share of the variance explained by
  main effects), PED-ANOVA (what it takes to reach the top quartile), and Sobol first/total
  indices when the sweep ran a Saltelli design (`sweep.searcher: sobol`);
- per-task sensitivity: fANOVA (PED-ANOVA without scikit-learn) for each task's metric;
- the metric against each parameter, with the binned mean and the best trial marked, and
  one-at-a-time curves around the best point where `--oat N` trained them (N values per
  parameter, the others held at the best trial's: extra training runs through Ray Tune);
- a summary in words ("α_instr explains 62% of the variance of the mean MRR@10 …").
Only complete trials (trained to train.max_steps) count unless `--all-trials`: an ASHA-stopped
trial's score is from a smaller budget. `tune.sweep` runs this at its end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tune import importance as imp
from tune import plots, results
from tune.plots import label
from tune.space import Range, resolve_space
from vipoly.tasks import TASKS

MIN_TRIALS = 4


def _context(root: Path) -> dict[str, Any]:
    """What sweep.yaml says: space, searcher, per-task metric, objective kind, Sobol n (defaults
    without it: the space is then inferred from the trials)."""
    path = root / "sweep.yaml"
    if not path.is_file():
        return {"space": None, "searcher": "unknown", "metric": "MRR@10", "objective": "mean", "sobol_n": 0}
    from tune.config import load_harness

    harness, _ = load_harness(path, section="sweep")
    s = harness.sweep
    return {"space": resolve_space(s.params), "searcher": s.searcher, "metric": harness.heldout.metric,
            "objective": harness.heldout.objective, "sobol_n": s.sobol_n}


def _inferred_space(rows: list[dict]) -> dict[str, Range]:
    names = list(dict.fromkeys(n for r in rows for n in r["params"]))
    space = {}
    for n in names:
        v = np.array([r["params"][n] for r in rows if n in r["params"]], float)
        lo, hi = float(v.min()), float(v.max())
        space[n] = Range(lo, hi if hi > lo else lo + 1e-9)
    return space


def _targets(rows: list[dict], metric: str, objective: str) -> dict[str, str]:
    """{printed name: metric key} of the objective and of each task present."""
    out = {f"objective ({objective} {metric})": "objective"}
    for t in TASKS:
        key = f"heldout/{t}/{metric}"
        if all(key in r["metrics"] for r in rows):
            out[t] = key
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def _direction(x: np.ndarray, y: np.ndarray) -> str:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return ""
    from scipy.stats import spearmanr

    rho = spearmanr(x, y).statistic
    if not np.isfinite(rho) or abs(rho) < 0.3:
        return "with no clear direction"
    return f"higher values scored {'higher' if rho > 0 else 'lower'} (Spearman ρ = {rho:+.2f})"


def analyse(rows: list[dict], space: dict[str, Range], metric: str, searcher: str = "unknown",
            sobol_n: int = 0) -> dict[str, Any]:
    """All numbers of the report (no files): importances per method and per task, curves, notes."""
    names = [n for n in space if all(n in r["params"] for r in rows)]
    space = {n: space[n] for n in names}
    X = np.array([[r["params"][n] for n in names] for r in rows], float)
    obj = np.array([r["metrics"]["objective"] for r in rows], float)
    out: dict[str, Any] = {"names": names, "X": X, "y": obj, "n": len(rows), "notes": [], "importance": {},
                           "per_task": {}, "curves": {}}
    if len(rows) < MIN_TRIALS:
        return out  # summary() says so
    if imp.fanova_available():
        out["importance"]["fANOVA"] = imp.fanova(X, obj, space)
    else:
        out["notes"].append("fANOVA skipped: it needs scikit-learn (pip install scikit-learn)")
    out["importance"]["PED-ANOVA"] = imp.ped_anova(X, obj, space)
    if len(rows) < 10:
        out["notes"].append(f"{len(rows)} complete trials: take the ranking as a hint (the estimators fit very few "
                            "points); more trials or a Sobol design give firmer numbers")
    top_n = int(np.ceil(0.25 * len(rows)))
    if top_n < 5:
        out["notes"].append(f"PED-ANOVA's top quartile holds {top_n} trials (it is steadier with ≥ 5)")
    if searcher == "sobol":
        designs = [r["design"] for r in rows]
        try:
            sob = imp.sobol_indices(designs, obj, names, sobol_n)
            out["importance"]["Sobol total"] = sob["total"]
            out["importance"]["Sobol first-order"] = sob["first"]
        except ValueError as e:
            out["notes"].append(f"Sobol indices skipped: {e}")
    per_task_method = "fANOVA" if imp.fanova_available() else "PED-ANOVA"
    out["per_task_method"] = per_task_method
    for name, key in _targets(rows, metric, "").items():
        if key == "objective":
            continue
        y = np.array([r["metrics"][key] for r in rows], float)
        values = (imp.fanova if per_task_method == "fANOVA" else imp.ped_anova)(X, y, space)
        out["per_task"][name] = {n: values.get(n, 0.0) for n in names}  # fixed column order across tasks
    for k, n in enumerate(names):
        out["curves"][n] = imp.partial_dependence(X[:, k], obj, bins=min(5, max(2, len(rows) // 4)))
    return out


def summary(a: dict[str, Any], what: str) -> list[str]:
    """Plain-language lines: what matters for the objective and for each task."""
    lines = []
    main = a["importance"].get("fANOVA") or a["importance"].get("Sobol total") or a["importance"].get("PED-ANOVA")
    if not main:
        return [f"Too few complete trials ({a['n']}) to rank the parameters (importances need ≥ {MIN_TRIALS})."]
    method = next(m for m in ("fANOVA", "Sobol total", "PED-ANOVA") if a["importance"].get(m) is main)
    ranked = sorted(main.items(), key=lambda kv: -kv[1])
    (p1, v1) = ranked[0]
    k1 = a["names"].index(p1)
    meaning = {"fANOVA": f"of the variance of the {what} that single parameters explain",
               "Sobol total": f"of the variance of the {what} (Sobol total index, interactions included)",
               "PED-ANOVA": f"of what separates the top-quartile trials of the {what} from the rest"}[method]
    lines.append(f"{label(p1)} explains {_pct(v1)} {meaning} ({method}, {a['n']} trials); "
                 f"{_direction(a['X'][:, k1], a['y'])}.".replace("; .", "."))
    if len(ranked) > 1:
        rest = ", ".join(f"{label(p)} {_pct(v)}" for p, v in ranked[1:4])
        lines.append(f"Next: {rest}.")
    small = [label(p) for p, v in ranked if v < 0.05]
    if small:
        verb = "hardly matters (< 5%)" if len(small) == 1 else "hardly matter (< 5% each)"
        lines.append(f"Within {'its range' if len(small) == 1 else 'their ranges'}, {', '.join(small)} {verb}.")
    other = [m for m in a["importance"] if m != method and not m.startswith("Sobol first")]
    for m in other:
        first = max(a["importance"][m].items(), key=lambda kv: kv[1])[0]
        agree = "agrees" if first == p1 else "disagrees"
        lines.append(f"{m} {agree}: it ranks {label(first)} first ({_pct(a['importance'][m][first])}).")
    for task, values in a["per_task"].items():
        p, v = max(values.items(), key=lambda kv: kv[1])
        lines.append(f"For {task}, {label(p)} matters most ({_pct(v)}, {a['per_task_method']}).")
    return lines


def _oat(rows: list[dict], names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{parameter: (values, objective)} of the one-at-a-time runs, the centre trial included."""
    by_id = {r["trial_id"]: r for r in rows}
    out: dict[str, list] = {}
    for r in rows:
        d = r.get("design") or []
        if len(d) >= 3 and d[0] == "OAT" and r["status"] == "complete" and d[2] in names:
            out.setdefault(d[2], []).append((r["params"][d[2]], r["metrics"]["objective"]))
            center = by_id.get(d[3]) if len(d) > 3 else None
            if center is not None and "objective" in center["metrics"]:
                out[d[2]].append((center["params"][d[2]], center["metrics"]["objective"]))
    return {n: tuple(np.array(v) for v in zip(*sorted(set(pts)))) for n, pts in out.items()}


def oat_summary(oat: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """Plain-language lines from the one-at-a-time curves: how far each parameter moves the objective."""
    if not oat:
        return []
    spread = sorted(((float(np.ptp(y)), n, x[np.argmax(y)]) for n, (x, y) in oat.items()), reverse=True)
    parts = [f"{label(n)} by {s:.3f} " + (f"(best at {xb:.4g})" if s > 0 else "(no effect)") for s, n, xb in spread]
    return ["One-at-a-time around the best trial, across its range each parameter moves the objective: "
            + "; ".join(parts) + "."]


def write_report(root: str | Path, all_trials: bool = False) -> Path:
    """Analyse RESULTS/trials.jsonl and write RESULTS/report.md + plots/; returns the report's path."""
    root = Path(root)
    rows = results.read(root)
    ctx = _context(root)
    searcher, metric = ctx["searcher"], ctx["metric"]
    search = [r for r in rows if r["experiment"] == "search" and "objective" in r["metrics"]
              and (r["status"] == "complete" or all_trials and r["status"] == "stopped")]
    space = ctx["space"] or _inferred_space(search or rows)
    plots_dir = root / "plots"
    plots_dir.mkdir(exist_ok=True)
    counts = {s: sum(r["status"] == s for r in rows if r["experiment"] == "search") for s in ("complete", "stopped", "error")}
    what = f"{'worst-task' if ctx['objective'] == 'worst' else 'mean'} {metric}"
    lines = [f"# Sensitivity report — {root.name}", "",
             f"Trials: {', '.join(f'{v} {k}' for k, v in counts.items())} (searcher: {searcher}); "
             f"{len(search)} used ({'complete and stopped' if all_trials else 'complete only: ASHA-stopped scores come from smaller budgets'}). "
             f"Objective: the {what} on held-out data (higher is better).", ""]
    a = analyse(search, space, metric, searcher, ctx["sobol_n"]) if search else None
    if a is None:
        lines += ["No usable trials yet."]
    else:
        oat = _oat(rows, a["names"])
        lines += ["## Summary", ""] + [f"- {s}" for s in summary(a, what) + oat_summary(oat)] + [""]
        lines += [f"- Note: {n}." for n in a["notes"]] + ([""] if a["notes"] else [])
        best = int(np.argmax(a["y"]))
        lines += ["## Best trial", "", f"`{search[best]['trial_id']}`: objective {a['y'][best]:.4f} with "
                  + ", ".join(f"{label(n)} = {search[best]['params'][n]:.4g}" for n in a["names"]), ""]
        top = sorted(range(len(search)), key=lambda k: -a["y"][k])[:5]
        tasks = [t for t in TASKS if f"heldout/{t}/{metric}" in search[0]["metrics"]]
        lines += ["## Top trials", "", "| trial | objective | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for k in top:
            m = search[k]["metrics"]
            lines.append(f"| `{search[k]['trial_id']}` | {a['y'][k]:.4f} | "
                         + " | ".join(f"{m[f'heldout/{t}/{metric}']:.3f}" for t in tasks) + " |")
        lines.append("")
        if a["importance"]:
            methods = list(a["importance"])
            lines += ["## Importance for the objective", "", "| parameter | range | " + " | ".join(methods) + " |",
                      "|---|---|" + "---|" * len(methods)]
            order = sorted(a["names"], key=lambda n: -a["importance"][methods[0]].get(n, 0))
            for n in order:
                r = space[n]
                lines.append(f"| {label(n)} (`{n}`) | {r.low:.4g}–{r.high:.4g}{' log' if r.log else ''} | "
                             + " | ".join(f"{a['importance'][m].get(n, 0):.3f}" for m in methods) + " |")
            plots.importance_bars({m: {n: a["importance"][m].get(n, 0.0) for n in order} for m in methods},
                                  f"Importance for the {what}", plots_dir / "importance.png")
            lines += ["", "![importance](plots/importance.png)", ""]
        if a["per_task"]:
            lines += [f"## Per-task sensitivity ({a['per_task_method']})", "",
                      "| task | " + " | ".join(label(n) for n in a["names"]) + " |",
                      "|---|" + "---|" * len(a["names"])]
            for task, v in a["per_task"].items():
                lines.append(f"| {task} | " + " | ".join(f"{v.get(n, 0):.2f}" for n in a["names"]) + " |")
            plots.heatmap(a["per_task"], f"Importance per task ({a['per_task_method']}, {metric})",
                          plots_dir / "importance_per_task.png")
            lines += ["", "![per task](plots/importance_per_task.png)", ""]
        plots.scatter_grid(a["X"], a["y"], a["names"], what, plots_dir / "metric_vs_params.png",
                           curves=a["curves"], best=best, extra=oat, ranges=space)
        lines += ["## The objective against each parameter", "",
                  "Dots: trials; line: binned mean ± std over the trials"
                  + ("; squares: one-at-a-time curves through the best point" if oat else
                     " (one-at-a-time curves: `python -m tune.sensitivity --results DIR --oat N`)") + ".", "",
                  "![metric vs parameters](plots/metric_vs_params.png)", ""]
    out = root / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tune.sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="a sweep's run.dir (holds trials.jsonl)")
    p.add_argument("--oat", type=int, default=0, metavar="N",
                   help="first train one-at-a-time curves: N values per parameter around the best trial")
    p.add_argument("--all-trials", action="store_true", help="also use ASHA-stopped trials (smaller budgets)")
    args = p.parse_args(argv)
    root = Path(args.results)
    try:
        results.read(root)
        if args.oat:
            from tune.config import load_harness
            from tune.runner import start_ray
            from tune.oat import run_oat

            harness, cfg = load_harness(root / "sweep.yaml", section="sweep")
            start_ray(cfg, harness.sweep.max_concurrent, harness.sweep.trial_resources.get("CPU", 0.0))
            run_oat(root.resolve(), args.oat)
        path = write_report(root, all_trials=args.all_trials)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sensitivity report → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
