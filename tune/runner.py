"""The Ray Tune layer shared by sweeps and ablations: data, initial models, the Tuner, resume.

An experiment lives in RUN_DIR/<name> (Tune's own state: `search/`, `oat/`, `ablate/`); its trials'
training runs in RUN_DIR/trials/<trial id>. Re-running the same command finds the experiment with
`Tuner.can_restore` and continues it with `Tuner.restore`: finished trials are kept, unfinished
and errored ones resume (each from its own latest training checkpoint). The restored experiment
keeps its original search space and settings; edits to the config apply to a new run.dir.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from tune.config import Harness
from tune.space import Range
from tune.trial import Job, run_trial
from vipoly.config import Config, ConfigError
from vipoly.folder import is_polyembedder_dir
from vipoly.ray_init import init_ray

METRIC, MODE = "objective", "max"


def prepare_data(harness: Harness, cfg: Config) -> None:
    """Generate synthetic train / held-out data where asked and absent; fail naming what is missing."""
    from vipoly.train.launch import check_config

    root = cfg.data.root
    if harness.synthetic is not None:
        from vipoly.data.synthetic import main as synthetic

        syn = harness.synthetic
        for where, n, seed in ((root, syn.n, syn.seed), (harness.heldout.root, syn.heldout_n, syn.seed + 1)):
            if where and not any(Path(where).glob("*/part-*.parquet")):
                synthetic(["--out", str(where), "--n", str(n), "--seed", str(seed)])
    check_config(cfg)
    held = Path(harness.heldout.root)
    if not any(held.glob("*/part-*.parquet")):
        raise ConfigError(f"heldout.data: no canonical shards (<task>/part-*.parquet) under {held}")
    if root and held.resolve() == Path(root).resolve():
        raise ConfigError(f"heldout.data is data.root ({held}): the objective must use data not trained on")


def open_harness(prog: str, doc: str | None, argv: list[str] | None, section: str,
                 check: Callable[[Harness, Config], None]) -> tuple[Harness, Config, Path] | None:
    """The shared start of `tune.sweep` and `tune.ablate`: parse `--config/--set`, load and `check`
    the harness, create `run.dir` (absolute from here on) with its data, and save the resolved
    harness as `<section>.yaml` there. None after printing the error (exit code 2)."""
    import argparse
    import sys

    from vipoly.config import add_config_args
    from tune.config import load_harness, save_harness

    parser = add_config_args(argparse.ArgumentParser(prog=prog, description=doc,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        harness, cfg = load_harness(args.config, args.overrides, section=section)
        check(harness, cfg)
        root = Path(cfg.run.dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        prepare_data(harness, cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    cfg.run.dir = str(root)
    save_harness(harness, cfg, root / f"{section}.yaml")
    return harness, cfg, root


def start_ray(cfg: Config, concurrent: int, trial_cpus: float) -> None:
    """Join the cluster (run.ray_address, RAY_ADDRESS, `ray job submit`), or start a local Ray whose
    logical CPUs fit `concurrent` trials. Each trial needs its Train workers' CPUs plus one whole
    CPU for its Ray Data read tasks: with less free the data stream waits forever, and with it the
    trial (2 trials × 0.5-CPU workers on a 2-core machine deadlock). Logical CPUs above the cores
    only oversubscribe them, as the tests' shared Ray does."""
    t = cfg.train
    need = concurrent * (t.num_workers * t.resources.cpus_per_worker + 1.0 + trial_cpus)
    init_ray(cfg.run.ray_address, num_cpus=max(os.cpu_count() or 1, math.ceil(need)), dashboard=True,
             verbose=cfg.run.verbose)


def interrupted(grid) -> bool:
    """Whether Tune returned before every trial ended (Ctrl-C, or the driver was told to stop)."""
    return grid.num_terminated + grid.num_errors < len(grid)


def build_inits(cfg: Config, root: Path, seeds) -> dict[int, str]:
    """{seed: directory} of the tiny model's random initialisation per training seed, built once
    here so that concurrent trials never race to build it (nothing when the backbone is real)."""
    if cfg.model.backbone != "tiny":
        return {}
    from vipoly.model.tiny import build_tiny

    out = {}
    for seed in sorted(set(seeds)):
        d = root / "init-models" / f"seed-{seed}"
        if not is_polyembedder_dir(d):
            build_tiny(d, seed=seed, heads=cfg.model)
        out[seed] = str(d)
    return out


def distributions(space: Mapping[str, Range]) -> dict[str, Any]:
    """Tune's param_space for searched designs (optuna_tpe, random)."""
    from ray import tune  # ray

    return {n: (tune.loguniform if r.log else tune.uniform)(r.low, r.high) for n, r in space.items()}


def fixed_points(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Tune's param_space for a fixed list of points (grid, Sobol, one-at-a-time, ablation cells):
    one trial per point, exactly, in order."""
    from ray import tune  # ray

    return {"point": tune.grid_search(points)}


def run_experiment(job: Job, *, param_space: dict, num_samples: int = 1, search_alg=None, scheduler=None,
                   max_concurrent: int = 2, resources: Mapping[str, float] | None = None):
    """Run (or resume) one Tune experiment whose trials are `run_trial`; returns Tune's ResultGrid."""
    from ray import tune  # ray
    from ray.tune.search import Searcher  # ray

    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), dict(resources or {"CPU": 0.01}))
    exp_dir = Path(job.root) / job.experiment
    if tune.Tuner.can_restore(exp_dir):  # ray: an interrupted (or finished) experiment
        print(f"resuming the {job.experiment} experiment in {exp_dir}", flush=True)
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, num_samples=num_samples, search_alg=search_alg, scheduler=scheduler,
                # Tune wraps a Searcher in a ConcurrencyLimiter; a generator (random) limits itself.
                max_concurrent_trials=max_concurrent if search_alg is None or isinstance(search_alg, Searcher) else None),
            run_config=tune.RunConfig(name=job.experiment, storage_path=str(job.root),
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1),
        )
    return tuner.fit()  # ray
