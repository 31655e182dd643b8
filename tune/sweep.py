"""Search loss and task weights (α_t, β, λ, margins, T) with Ray Tune over Ray Train runs.

    python -m tune.sweep --config configs/sweep-tiny.yaml [--set sweep.num_samples=8 ...]
    ray job submit --working-dir . -- python -m tune.sweep --config configs/sweep-alpha-2b.yaml

Each trial trains the model with one point of the search space (a Ray Train `TorchTrainer`, built by
`vipoly.train.launch.build_trainer`) and is scored on held-out canonical shards: the mean over tasks
of a retrieval metric, or its worst task (`heldout.objective`). Optuna TPE proposes points and ASHA
stops weak trials at intermediate evaluations by default; random search, a full grid and a
Saltelli/Sobol design are one `sweep.searcher` away. run.dir then holds

    trials/<trial id>/   each trial's training run directory + trial.json
    search/              Tune's experiment state (re-running the command resumes from it)
    trials.csv, trials.jsonl   one row per trial: parameters, status, held-out metrics per task
    sweep.yaml           the resolved config
    report.md, plots/    the sensitivity report (`python -m tune.sensitivity`), unless sweep.sensitivity=false
"""
from __future__ import annotations

import sys

from tune import results
from tune.config import Harness
from tune.runner import build_inits, distributions, fixed_points, interrupted, start_ray, open_harness, run_experiment
from tune.space import grid_points, resolve_space, sobol_design
from tune.trial import Job
from vipoly.config import Config, ConfigError


def eval_every(harness: Harness, cfg: Config) -> int | None:
    s = harness.sweep
    if s.eval_every is not None:
        return s.eval_every
    return max(1, cfg.train.max_steps // 4) if s.scheduler == "asha" else None


def check(harness: Harness, cfg: Config) -> None:
    s = harness.sweep
    space = resolve_space(s.params)  # names and ranges fail here, before any data or Ray work
    if s.searcher == "sobol":
        sobol_design(space, s.sobol_n, s.seed)
    if cfg.train.max_steps <= 0 and (s.scheduler == "asha" or s.eval_every):
        raise ConfigError("sweep.scheduler=asha and sweep.eval_every need train.max_steps > 0 (a known budget)")
    if cfg.stw.mode.value != "dynamic" and any(n.startswith(("stw.alpha", "stw.beta")) for n in space):
        raise ConfigError(f"sweep.params vary α/β but stw.mode={cfg.stw.mode.value}: they act only in dynamic mode")


def search(harness: Harness, cfg: Config):
    """(param_space, num_samples, search_alg, scheduler) for the configured searcher and scheduler."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # ray
    from ray.tune.search.basic_variant import BasicVariantGenerator  # ray

    s = harness.sweep
    space = resolve_space(s.params)
    if s.searcher == "optuna_tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch  # ray

        algo = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed))
        space_, n = distributions(space), s.num_samples
    elif s.searcher == "random":
        # A SearchGenerator limits its own concurrency (TuneConfig's limit applies to Searchers only).
        algo = BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent)
        space_, n = distributions(space), s.num_samples
    elif s.searcher == "grid":
        algo, space_, n = None, fixed_points(grid_points(space, s.grid_points)), 1
    else:
        algo, space_, n = None, fixed_points(sobol_design(space, s.sobol_n, s.seed)), 1
    if s.scheduler == "asha":
        every = eval_every(harness, cfg)
        scheduler = ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps, grace_period=s.grace_period or every,
                                  reduction_factor=s.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return space_, n, algo, scheduler


def main(argv: list[str] | None = None) -> int:
    opened = open_harness("python -m tune.sweep", __doc__, argv, "sweep", check)
    if opened is None:
        return 2
    harness, cfg, root = opened
    s = harness.sweep
    space = resolve_space(s.params)
    print(f"vipoly sweep → {root}: {s.searcher} + {s.scheduler}, objective = {harness.heldout.objective} "
          f"{harness.heldout.metric} over tasks on {harness.heldout.root}\n"
          + "\n".join(f"  {n}: [{r.low:g}, {r.high:g}]{' log' if r.log else ''}" for n, r in space.items()), flush=True)

    start_ray(cfg, s.max_concurrent, s.trial_resources.get("CPU", 0.0))
    inits = build_inits(cfg, root, [cfg.train.seed])
    param_space, n, algo, scheduler = search(harness, cfg)
    grid = run_experiment(Job.of(harness, cfg, root, "search", inits, eval_every(harness, cfg)), param_space=param_space,
                   num_samples=n, search_alg=algo, scheduler=scheduler, max_concurrent=s.max_concurrent,
                   resources=s.trial_resources)
    if interrupted(grid):
        results.write(root, results.collect(root, cfg.train.max_steps, finished=False))
        print(f"sweep interrupted: re-run the same command to resume it ({root / 'search'})", file=sys.stderr)
        return 1
    rows = results.collect(root, cfg.train.max_steps)
    jl, cs = results.write(root, rows)
    counts = {st: sum(r["status"] == st for r in rows) for st in ("complete", "stopped", "error")}
    print(f"{len(rows)} trials ({', '.join(f'{v} {k}' for k, v in counts.items() if v)}) → {cs}", flush=True)
    top = results.best(rows)
    if top is not None:
        print(f"best: trial {top['trial_id']} objective {top['metrics']['objective']:.4f} with "
              + ", ".join(f"{k}={v:.4g}" for k, v in top["params"].items()), flush=True)
    if s.oat:
        from tune.oat import run_oat

        run_oat(root, s.oat)
    if s.sensitivity:
        from tune.sensitivity import write_report

        print(f"sensitivity report → {write_report(root)}", flush=True)
    return 0 if counts["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
