"""dle_loss forward+backward vs plain symmetric InfoNCE on the same tensors (CPU).

    python bench/dle_loss.py [--batch 480] [--dim 1024] [--reps 30]

Baseline: one similarity matrix, CE in both directions, mean: the cheapest contrastive loss there
is. Ours: the full DLE mix (all five tasks in the batch, score MSE, margin ranking over the
text_pair pairs, cosine, hardest-negative triplet) plus its stats. Target: ours ≤ 1.5× baseline.
Prints both medians, the ratio, and a markdown row for docs/benchmarks.md. Also timed, same run:
DLE with the false-negative mask (`pos_keys`, one row in ten sharing a positive), what
`loss.mask_duplicates` adds.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from vipoly.losses import dle_loss
from vipoly.tasks import TASKS


def baseline(a, b, temperature):
    logits = a @ b.T / temperature
    target = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def fwd_bwd_seconds(fn, a0, b0) -> float:
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    t0 = time.perf_counter()
    fn(a, b).backward()
    return time.perf_counter() - t0


def interleaved(fns: dict, a0, b0, reps: int, warmup: int) -> dict[str, list[float]]:
    """Alternate the contenders rep by rep, so that a load change on a shared machine hits both."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for k in range(warmup + reps):
        for name, fn in fns.items():
            dt = fwd_bwd_seconds(fn, a0, b0)
            if k >= warmup:
                times[name].append(dt)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=480)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    a0 = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=-1)
    b0 = F.normalize(a0 + torch.randn(args.batch, args.dim, generator=g), dim=-1)
    task_ids = torch.arange(args.batch) % len(TASKS)  # all five tasks, equal shares
    scores = torch.where(task_ids == 0, torch.rand(args.batch, generator=g), torch.tensor(float("nan")))
    weights = torch.tensor([0.27, 1.25, 1.0, 1.0, 1.0])
    temperature = 0.07

    keys = torch.arange(args.batch) % max(1, args.batch * 9 // 10)  # every tenth positive repeats one
    times = interleaved({"baseline": lambda a, b: baseline(a, b, temperature),
                         "dle": lambda a, b: dle_loss(a, b, task_ids, scores, weights)[0],
                         "masked": lambda a, b: dle_loss(a, b, task_ids, scores, weights, pos_keys=keys)[0]},
                        a0, b0, args.reps, args.warmup)
    t_base, t_dle = (statistics.median(times[k]) for k in ("baseline", "dle"))
    ratio = statistics.median(d / b for d, b in zip(times["dle"], times["baseline"]))  # paired: robust to load
    print(f"B={args.batch} D={args.dim} fp32 CPU, {torch.get_num_threads()} threads, median of {args.reps}")
    print(f"baseline symmetric InfoNCE fwd+bwd: {t_base * 1e3:8.2f} ms")
    print(f"dle_loss (5 tasks) fwd+bwd:         {t_dle * 1e3:8.2f} ms")
    print(f"ratio dle/baseline (median of paired reps): {ratio:.2f}x  (target <= 1.5x)")
    masked = statistics.median(m / d for m, d in zip(times["masked"], times["dle"]))
    print(f"dle_loss with the false-negative mask: {statistics.median(times['masked']) * 1e3:8.2f} ms, "
          f"{masked:.2f}x plain dle_loss")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print("\nmarkdown row:")
    print(f"| dle_loss fwd+bwd vs InfoNCE (B={args.batch}, D={args.dim}, CPU) | {t_base * 1e3:.1f} ms | "
          f"{t_dle * 1e3:.1f} ms | {ratio:.2f}x | {machine}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()} |")


if __name__ == "__main__":
    main()
