"""Where a CPU run decodes its images: in Ray tasks (`data.decode_in_tasks=true`, what a GPU run
does) or in the training workers (the CPU default). For each, a fresh local Ray runs `--fits`
short pipelines.train fits one after another (2 workers, the tiny model, synthetic data with
images); prints each fit's wall time and the machine's busy CPU-seconds, then the ratios.

    .venv/bin/python bench/decode_placement.py [--fits 3] [--steps 6]

The first fit of the task path pays for its task processes (each imports transformers' image code);
later fits reuse them while Ray keeps them. The real loop, end to end (driver, controller, workers).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("WANDB_MODE", "disabled")


def busy_cpu_s() -> float:
    """The machine's busy CPU-seconds so far (all processes: Ray's workers are not our children)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_mode(in_tasks: bool, fits: int, steps: int, tmp: Path) -> list[tuple[float, float]]:
    import ray

    from pipelines import train as train_pipeline

    env = {k: os.environ[k] for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = []
    try:
        for i in range(fits):
            run = tmp / f"{'tasks' if in_tasks else 'worker'}-{i}"
            t0, c0 = time.time(), busy_cpu_s()
            rc = train_pipeline.main([
                "--config", str(REPO / "configs" / "tiny-cpu.yaml"), "--set", f"data.root={tmp / 'data'}",
                "--set", f"run.dir={run}", "--set", f"model.backbone={tmp / 'init'}", "--set", "run.wandb=disabled",
                "--set", f"train.max_steps={steps}", "--set", f"train.checkpoint.every={steps}",
                "--set", f"data.decode_in_tasks={str(in_tasks).lower()}"])
            assert rc == 0, f"fit {i} failed"
            out.append((time.time() - t0, busy_cpu_s() - c0))
    finally:
        ray.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fits", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()

    import ray
    import torch

    from vipoly.data.synthetic import main as synthetic
    from vipoly.model.tiny import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="vipoly-bench-decode-"))
    synthetic(["--out", str(tmp / "data"), "--n", "200", "--seed", "0"])
    build_tiny(tmp / "init", seed=0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__}, ray {ray.__version__}; {args.fits} fits of {args.steps} steps, 2 workers")
    results = {mode: run_mode(mode == "tasks", args.fits, args.steps, tmp) for mode in ("tasks", "worker")}
    for mode, rows in results.items():
        print(f"{mode:>6}: " + "  ".join(f"fit {i}: {w:5.1f} s, {c:5.1f} CPU-s" for i, (w, c) in enumerate(rows)))
    for i in range(args.fits):
        (wt, ct), (ww, cw) = results["tasks"][i], results["worker"][i]
        print(f"fit {i}: worker / tasks = {ww / wt:.2f}× wall, {cw / ct:.2f}× CPU")


if __name__ == "__main__":
    main()
