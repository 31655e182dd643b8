"""LoRA against full fine-tuning, on the real training loop (`run_training` in one process, the
same config, data and batches): trainable parameters, the optimizer's state in bytes, and the
median step time after warm-up, with the ratios LoRA / full.

    .venv/bin/python bench/lora.py [--r 16] [--steps 30] [--warmup 10] [--set model.backbone=DIR ...]

Without `model.backbone` it trains the tiny random Qwen2-VL (`vipoly.model.tiny`) on CPU; with a
Qwen2-VL-2B folder and a GPU (`--set train.resources.use_gpu=true`) the same comparison at the real size.
Optimizer state = the bytes of AdamW's tensors after one step of `build_optimizer` on the model
as that run builds it (exp_avg and exp_avg_sq of every trainable tensor).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")


def optimizer_bytes(model, tcfg) -> int:
    """Bytes of AdamW's state after one step on zero gradients."""
    from vipoly.train.optim import build_optimizer

    opt = build_optimizer(model, tcfg)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = p.detach().new_zeros(p.shape)
    opt.step()
    size = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if hasattr(t, "numel"))
    model.zero_grad(set_to_none=True)
    return size


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--r", type=int, default=16, help="LoRA rank (VLM2Vec's Qwen2-VL-2B recipe: 16)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--set", action="append", default=[], help="config override for both paths, key=value")
    args = p.parse_args()

    import torch

    from vipoly.config import load_config
    from vipoly.data.synthetic import main as synthetic
    from vipoly.model import PolyEmbedder
    from vipoly.model.inputs import effective_model_config, write_inputs
    from vipoly.model.tiny import build_tiny
    from vipoly.train.launch import StreamFactory
    from vipoly.train.loop import run_training
    from vipoly.train.monitor import read_metrics

    tmp = Path(tempfile.mkdtemp(prefix="vipoly-bench-lora-"))
    synthetic(["--out", str(tmp / "data"), "--n", "400", "--seed", "0"])
    build_tiny(tmp / "init", seed=0)

    results = {}
    for name, extra in (("full", []), (f"lora r={args.r}", [f"model.lora.r={args.r}"])):
        run = tmp / name.replace(" ", "_").replace("=", "")
        cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [
            f"data.root={tmp / 'data'}", f"run.dir={run}", f"model.backbone={tmp / 'init'}", "train.num_workers=1",
            f"train.max_steps={args.steps}", "train.log_every=1", "run.wandb=disabled",
            f"train.checkpoint.every={args.steps}", "train.checkpoint.strategic=[]", *args.set, *extra])
        cfg.model = effective_model_config(cfg.model)
        run.mkdir()
        write_inputs(cfg)  # as pipelines.train does before training
        counts = PolyEmbedder.build(cfg.model).parameter_counts()
        opt_bytes = optimizer_bytes(PolyEmbedder.build(cfg.model), cfg.train)
        run_training(cfg, StreamFactory(cfg), use_ray=False)
        rows = read_metrics(run / "metrics.jsonl")[args.warmup:]
        step = statistics.median(cfg.train.batch_size / r["samples_per_s"] for r in rows)
        results[name] = (counts["params/trainable"], counts["params/total"], opt_bytes, step)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}, overrides {args.set or 'none'}; path: run_training, one process")
    print(f"{'run':<12} {'trainable':>12} {'total':>12} {'optimizer state':>16} {'median step (ms)':>17}")
    for name, (trainable, total, opt_bytes, step) in results.items():
        print(f"{name:<12} {trainable:>12,} {total:>12,} {opt_bytes / 2**20:>13.2f} MiB {step * 1e3:>17.1f}")
    (ft, _, fo, fs), (lt, _, lo, ls) = results.values()
    print(f"LoRA / full: trainable {lt / ft:.3f}x, optimizer state {lo / fo:.3f}x, step time {ls / fs:.3f}x")


if __name__ == "__main__":
    main()
