"""One-at-a-time curves around a sweep's best trial (`python -m tune.sensitivity --oat N`, or
`sweep.oat` in a sweep config): for each swept parameter, N values across its range with the others
held at the best point, trained as a fifo experiment named `oat` beside the search."""
from __future__ import annotations

from pathlib import Path

from tune import results
from tune.config import load_harness
from tune.runner import build_inits, fixed_points, interrupted, run_experiment
from tune.space import oat_points, resolve_space
from tune.trial import Job


def run_oat(root: Path, n: int) -> list[dict]:
    """Train one-at-a-time curves around the best complete trial: for each parameter, n values
    across its range with the others held at the best point (a fifo experiment named `oat`)."""
    harness, cfg = load_harness(root / "sweep.yaml", section="sweep")
    rows = results.collect(root, cfg.train.max_steps)
    top = results.best([r for r in rows if r["experiment"] == "search"])
    if top is None:
        raise ValueError(f"{root}: no complete search trial to centre the one-at-a-time curves on")
    space = resolve_space(harness.sweep.params)
    points = oat_points(space, top["params"], n, center_id=top["trial_id"])
    inits = build_inits(cfg, root, [cfg.train.seed])
    print(f"one-at-a-time: {len(points)} trials around trial {top['trial_id']}", flush=True)
    grid = run_experiment(Job.of(harness, cfg, root, "oat", inits), param_space=fixed_points(points),
                          max_concurrent=harness.sweep.max_concurrent, resources=harness.sweep.trial_resources)
    if interrupted(grid):
        raise RuntimeError(f"one-at-a-time runs interrupted: re-run to resume them ({root / 'oat'})")
    rows = results.collect(root, cfg.train.max_steps)
    results.write(root, rows)
    return rows
