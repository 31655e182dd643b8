"""GradCache against the plain step, on the real training loop (`run_training` in one process,
the same config, data and batches): peak memory and median step time, and the ratios.

    .venv/bin/python bench/gradcache.py [--batch 64] [--chunk 8] [--steps 12] [--warmup 4] [--set key=value ...]
    .venv/bin/python bench/gradcache.py --fit-mib 3000 [--chunk 8]   # the largest batch each path fits

Each path runs in a process of its own, so that its peak is its own: the peak resident memory
(ru_maxrss; on a GPU also torch.cuda.max_memory_allocated, which is the number that decides the
batch a card can hold). On CPU with the tiny model the activations are small beside the libraries
that every process loads; the GPU run with Qwen2-VL-2B (`--set model.backbone=DIR --set
train.resources.use_gpu=true`) is where the largest batch each path fits is found.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")


def child(args: argparse.Namespace) -> None:
    """One path: train, then print its numbers as one JSON line."""
    import resource

    import torch

    from vipoly.config import load_config
    from vipoly.model.inputs import effective_model_config, write_inputs
    from vipoly.train.launch import StreamFactory
    from vipoly.train.loop import run_training
    from vipoly.train.monitor import read_metrics

    run = Path(args.run)
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [
        f"data.root={args.data}", f"run.dir={run}", f"model.backbone={args.init}", "train.num_workers=1",
        f"train.batch_size={args.batch}", "train.grad_accum=1", f"train.max_steps={args.steps}",
        "train.log_every=1", "run.wandb=disabled", f"train.checkpoint.every={args.steps}",
        "train.checkpoint.strategic=[]", f"train.gradcache_chunk={args.chunk}", *args.set])
    cfg.model = effective_model_config(cfg.model)
    run.mkdir(parents=True)
    write_inputs(cfg)
    run_training(cfg, StreamFactory(cfg), use_ray=False)
    rows = read_metrics(run / "metrics.jsonl")[args.warmup:]
    step = statistics.median(args.batch / r["samples_per_s"] for r in rows)
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(json.dumps({"step_s": step, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "gpu_mib": gpu / 2**20 if gpu else None, "losses": [r["loss"] for r in rows]}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--set", action="append", default=[], help="config override for both paths, key=value")
    p.add_argument("--fit-mib", type=float, default=0,
                   help="find the largest batch (a multiple of 8) each path trains in this peak memory (MiB; "
                        "peak GPU memory on a GPU, else peak RSS)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import torch

    from vipoly.data.synthetic import main as synthetic
    from vipoly.model.tiny import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="vipoly-bench-gradcache-"))
    synthetic(["--out", str(tmp / "data"), "--n", str(max(4000 if args.fit_mib else 400, args.batch * (args.steps + 2))),
               "--seed", "0"])
    build_tiny(tmp / "init", seed=0)

    def measure(chunk: int, batch: int, steps: int, warmup: int) -> dict:
        run = tmp / f"run-c{chunk}-b{batch}"
        cmd = [sys.executable, __file__, "--child", "--run", str(run), "--data", str(tmp / "data"),
               "--init", str(tmp / "init"), "--batch", str(batch), "--chunk", str(chunk),
               "--steps", str(steps), "--warmup", str(warmup)] + [a for s in args.set for a in ("--set", s)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    if args.fit_mib:
        return fit(args, measure, torch)
    results = {}
    for name, chunk in (("plain", 0), (f"gradcache C={args.chunk}", args.chunk)):
        results[name] = measure(chunk, args.batch, args.steps, args.warmup)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}, batch {args.batch} per step, overrides {args.set or 'none'}; "
          f"path: run_training, one process each")
    print(f"{'path':<16} {'median step (ms)':>17} {'peak RSS (MiB)':>15} {'peak GPU (MiB)':>15}")
    for name, r in results.items():
        gpu = f"{r['gpu_mib']:.0f}" if r["gpu_mib"] else "-"
        print(f"{name:<16} {r['step_s'] * 1e3:>17.1f} {r['rss_mib']:>15.0f} {gpu:>15}")
    plain, cached = results.values()
    worst = max(abs(a - b) for a, b in zip(plain["losses"], cached["losses"]))
    print(f"GradCache / plain: step time {cached['step_s'] / plain['step_s']:.2f}x, peak RSS "
          f"{cached['rss_mib'] / plain['rss_mib']:.2f}x; largest loss difference {worst:.1e}")


def fit(args: argparse.Namespace, measure, torch) -> None:
    """The largest batch (a multiple of 8) each path trains within `--fit-mib` of peak memory:
    doubling from 8 until a batch does not fit, then bisecting. Two steps a run (the peak comes
    with the first)."""
    def peak(r: dict) -> float:
        return r["gpu_mib"] or r["rss_mib"]

    found = {}
    for name, chunk in (("plain", 0), (f"gradcache C={args.chunk}", args.chunk)):
        fits, lo, hi = {}, 0, 8
        while True:  # doubling
            fits[hi] = peak(measure(chunk, hi, 2, 0))
            print(f"  {name}: batch {hi}: peak {fits[hi]:.0f} MiB", flush=True)
            if fits[hi] > args.fit_mib:
                break
            lo, hi = hi, hi * 2
        while hi - lo > 8:  # bisect on multiples of 8
            mid = (lo + hi) // 16 * 8
            fits[mid] = peak(measure(chunk, mid, 2, 0))
            print(f"  {name}: batch {mid}: peak {fits[mid]:.0f} MiB", flush=True)
            lo, hi = (mid, hi) if fits[mid] <= args.fit_mib else (lo, mid)
        found[name] = (lo, fits.get(lo))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, budget "
          f"{args.fit_mib:.0f} MiB of peak {'GPU memory' if torch.cuda.is_available() else 'RSS'}, overrides "
          f"{args.set or 'none'}; path: run_training, one process each")
    print(f"{'path':<16} {'largest batch':>14} {'its peak (MiB)':>15}")
    for name, (batch, mib) in found.items():
        print(f"{name:<16} {batch:>14} {mib or float('nan'):>15.0f}")
    plain, cached = (b for b, _ in found.values())
    print(f"GradCache / plain: largest batch {cached / max(plain, 1):.2f}x")


if __name__ == "__main__":
    main()
