"""How long a ZeRO-2 checkpoint of 2 workers takes to convert for another number of workers
(`vipoly.train.engine.reshard`: DeepSpeed's `ds_to_universal`, run by rank 0 before a run resumed on
fewer or more workers trains), at Qwen2-VL-2B's widths with fewer layers.

    .venv/bin/python bench/reshard.py [--text-layers 4] [--vision-depth 4] [--repeat 2]

It trains 1 step of the ZeRO-2 strategy with 2 workers (`pipelines.train`, the tiny run's config
and synthetic data, the model at the 2B's widths: text 1536 wide with 8960-wide MLPs, vision 1280
wide, random float32 weights, the tiny tokenizer's vocabulary), then times `reshard` of its
checkpoint for 1 worker `--repeat` times, in this process (the conversion is a subprocess of its
own, as in a run), each time after the baseline: copying the checkpoint's files, the I/O a
conversion pays at least. Prints the checkpoint's bytes, both times, their ratio, and the
conversion's rate in GB/s, with which docs/scale.md estimates the real 2B's (its bytes scale with
the parameters).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from resume_load import TEXT, VISION  # noqa: E402  (the 2B's widths)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()

    import deepspeed
    import torch
    from safetensors import safe_open

    from vipoly.data.synthetic import write_synthetic
    from vipoly.model.tiny import build_tiny
    from vipoly.train.engine import reshard

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="reshard-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        backbone, data, run = work / "backbone", work / "data", work / "run"
        if not (backbone / "vipoly.json").is_file():
            build_tiny(backbone, text=dict(TEXT, num_hidden_layers=args.text_layers),
                       vision=dict(VISION, depth=args.vision_depth))
        if not data.is_dir():
            write_synthetic(data, n=60, seed=0)
        with safe_open(str(backbone / "model.safetensors"), "pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        if not (run / "checkpoint-0000001").is_dir():
            shutil.rmtree(run, ignore_errors=True)
            t = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "pipelines.train", "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
                 "--set", f"data.root={data}", "--set", f"run.dir={run}", "--set", f"model.backbone={backbone}",
                 "--set", "train.strategy=deepspeed_zero2", "--set", "train.num_workers=2",
                 "--set", "train.max_steps=1", "--set", "train.checkpoint.every=1", "--set", "train.batch_size=2",
                 "--set", "run.wandb=disabled"],
                cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"training failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            print(f"trained 1 ZeRO-2 step on 2 workers in {time.perf_counter() - t:.0f} s", flush=True)
        ckpt = run / "checkpoint-0000001"
        state = ckpt / "deepspeed" / "state"
        size = folder_bytes(state)
        print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
              f"Python {platform.python_version()}")
        print(f"model: {params / 1e6:.0f}M parameters ({args.text_layers} text layers, {args.vision_depth} vision "
              f"blocks at the 2B's widths); checkpoint state {size / 1e9:.2f} GB "
              f"({size / params:.1f} bytes a parameter)", flush=True)
        times, copies = [], []
        for _ in range(args.repeat):
            # the baseline: copying the checkpoint's files, the I/O any conversion pays at least
            shutil.rmtree(work / "copy", ignore_errors=True)
            t = time.perf_counter()
            shutil.copytree(state, work / "copy")
            copies.append(time.perf_counter() - t)
            shutil.rmtree(work / "copy")
            print(f"copy of the checkpoint's state (baseline): {copies[-1]:.1f} s", flush=True)
            shutil.rmtree(work / ".resharded", ignore_errors=True)
            t = time.perf_counter()
            out = reshard(ckpt, work, rank=0, world=1)
            times.append(time.perf_counter() - t)
            written = folder_bytes(out)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB → GiB, any process it waited for
            print(f"reshard 2 → 1 workers: {times[-1]:.1f} s, wrote {written / 1e9:.2f} GB; the largest process "
                  f"so far peaked at {peak:.2f} GiB", flush=True)
        best = min(times)
        print(f"reshard: median {statistics.median(times):.1f} s, best {best:.1f} s: {size / 1e9 / best:.2f} GB/s of "
              f"checkpoint read, {params / 1e6 / best:.0f}M parameters/s")
        print(f"copy: median {statistics.median(copies):.1f} s; reshard / copy (medians): "
              f"{statistics.median(times) / statistics.median(copies):.1f}×")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
