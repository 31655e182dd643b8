"""AdamW with differential learning rates and a warm-up + decay schedule (SPEC §4).

Groups: vision tower (2e-6 by default: its pretrained features break easily), the language model
(2e-5), and the new heads (pooling + projection; `train.optimizer.head_lr`, default =
`train.optimizer.lr`). Biases and norm weights get no weight decay.
"""
from __future__ import annotations

import math

import torch

from vipoly.model.embedder import component_of
from vipoly.train.config import OptimizerConfig


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict]:
    lrs = {"vision": cfg.vision_lr, "language": cfg.lr, "pooling": cfg.head_lr or cfg.lr,
           "projection": cfg.head_lr or cfg.lr}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(".bias")
        groups.setdefault((component_of(name), no_decay), []).append(p)
    return [
        {"params": ps, "lr": lrs[comp], "weight_decay": 0.0 if nd else cfg.weight_decay, "name": f"{comp}{'/no_decay' if nd else ''}"}
        for (comp, nd), ps in sorted(groups.items())
        if lrs[comp] > 0
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, total: int, cfg: OptimizerConfig) -> float:
    """Multiplier of each group's base LR at `step` (0-based) of `total` optimizer steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimizerConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
