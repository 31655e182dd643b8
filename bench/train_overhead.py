"""Ray Train overhead: the same training loop, same tiny model and batches, (a) in one plain
process and (b) inside a 1-worker Ray Train TorchTrainer. Prints the median step time of each
after warm-up and the ratio (target ≤ 1.15×).

    .venv/bin/python bench/train_overhead.py [--steps 40] [--warmup 10] [--set data.prefetch_batches=0]

Step time = wall time of one optimizer step as the loop measures it (data → forward → loss →
backward → step → cross-worker reduction), from metrics.jsonl's samples_per_s; Ray Train's
checkpoint/report calls happen between steps and are reported separately (total wall time).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("WANDB_MODE", "disabled")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--set", action="append", default=[], help="config override for both paths, key=value")
    args = p.parse_args()

    import ray
    import torch

    from vipoly.train.launch import build_trainer
    from vipoly.config import load_config
    from vipoly.data.synthetic import main as synthetic
    from vipoly.model.inputs import write_inputs
    from vipoly.model.tiny import build_tiny
    from vipoly.train.launch import StreamFactory
    from vipoly.train.loop import run_training
    from vipoly.train.monitor import read_metrics

    tmp = Path(tempfile.mkdtemp(prefix="vipoly-bench-"))
    synthetic(["--out", str(tmp / "data"), "--n", "400", "--seed", "0"])
    build_tiny(tmp / "init", seed=0)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # a fresh instance
    ray.data.DataContext.get_current().enable_progress_bars = False
    torch.set_num_threads(1)

    def cfg_for(name: str):
        return load_config(REPO / "configs" / "tiny-cpu.yaml", [
            f"data.root={tmp / 'data'}", f"run.dir={tmp / name}", f"model.backbone={tmp / 'init'}",
            "train.num_workers=1", f"train.max_steps={args.steps}", "train.log_every=1", "run.wandb=disabled",
            f"train.checkpoint.every={args.steps}", "train.checkpoint.strategic=[]", *args.set])

    results = {}
    for name in ("plain", "ray_train"):
        cfg = cfg_for(name)
        (tmp / name).mkdir()
        write_inputs(cfg)  # as pipelines.train does before training
        t0 = time.time()
        if name == "plain":
            run_training(cfg, StreamFactory(cfg), use_ray=False)
        else:
            build_trainer(cfg, tmp / name).fit()
        wall = time.time() - t0
        rows = read_metrics(tmp / name / "metrics.jsonl")[args.warmup:]
        per_step = [cfg.train.batch_size / r["samples_per_s"] for r in rows]
        results[name] = (statistics.median(per_step), wall)

    ratio = results["ray_train"][0] / results["plain"][0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}, overrides {args.set or 'none'}")
    print(f"{'path':<10} {'median step (ms)':>17} {'total wall (s)':>15}")
    for name, (step, wall) in results.items():
        print(f"{name:<10} {step * 1e3:>17.1f} {wall:>15.1f}")
    print(f"overhead ratio (Ray Train / plain, median step after {args.warmup} warm-up steps): {ratio:.3f}x "
          f"(target <= 1.15x)")
    ray.shutdown()


if __name__ == "__main__":
    main()
