"""What a run shows while it trains: metrics.jsonl, wandb, a console line (SPEC §4 monitoring).

Everything here runs on world rank 0 only; the numbers it logs are already reduced across workers.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

import torch

from vipoly.tasks import TASKS
from vipoly.model.embedder import COMPONENTS, component_of


def grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """Global and per-component L2 gradient norms (vision, language, pooling, projection)."""
    sq = dict.fromkeys(COMPONENTS, 0.0)
    for name, p in model.named_parameters():
        if p.grad is not None:
            sq[component_of(name)] += float(p.grad.detach().float().pow(2).sum())
    out = {f"grad_norm/{c}": math.sqrt(v) for c, v in sq.items()}
    out["grad_norm"] = math.sqrt(sum(sq.values()))
    return out


def pooling_entropy(weights: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean entropy (nats) of the pooling distributions, normalised by log(#tokens): 1 = uniform."""
    w = weights.detach().float()
    if w.ndim == 3:  # multi-head: (B, H, N)
        w, mask = w.flatten(0, 1), mask.repeat_interleave(weights.shape[1], 0)
    n = mask.sum(-1).clamp(min=2).float()
    ent = -(w.clamp_min(1e-12).log() * w * mask).sum(-1)
    return float((ent / n.log()).mean())


class Volatility:
    """Rolling std/mean of the loss over the last `window` logged values."""

    def __init__(self, window: int = 20):
        self.values: deque[float] = deque(maxlen=window)

    def __call__(self, loss: float) -> float:
        self.values.append(loss)
        if len(self.values) < 2:
            return 0.0
        m = sum(self.values) / len(self.values)
        sd = math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))
        return sd / abs(m) if m else 0.0


def weight_drift(current: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> float:
    """‖W − W₀‖ / ‖W₀‖ over the weights named in `initial` (the projection's: `engine.full_weights`)."""
    num = den = 0.0
    for name, w0 in initial.items():
        num += float((current[name].float() - w0).pow(2).sum())
        den += float(w0.pow(2).sum())
    return math.sqrt(num / den) if den else float("nan")


class MetricsLog:
    """Append-only metrics.jsonl that never repeats a step: on resume, rows past the resumed step
    (written after the last checkpoint by a run that then died) are dropped first."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Console:
    """One progress line per logged step: step, loss, per-task loss, λ, samples/s, ETA."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total, self.t0, self.s0 = total_steps, time.time(), start_step

    def line(self, row: dict) -> str:
        step = row["step"]
        rate = (step - self.s0) / max(1e-9, time.time() - self.t0)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        tasks = " ".join(
            f"{t[:6]}={row[f'loss/{t}']:.3f}×{row[f'weight/{t}']:.2f}" for t in TASKS if f"loss/{t}" in row
        )
        return (f"step {step}/{self.total} [{row['phase'][:5]}] loss {row['loss']:.4f} | {tasks} | "
                f"{row['samples_per_s']:.1f} samples/s | ETA {_fmt(eta)}")


def _fmt(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def quiet_worker_logs(verbose: bool, rank: int) -> None:
    """A Ray Train worker's console: our INFO lines from rank 0 only (the others repeat them), and
    Ray Train's INFO lines (each checkpoint report, logged by a logger outside `ray.train`) only
    when run.verbose. A propagated record meets no ancestor's level, only the root's handlers, so
    the root's level quiets loggers without a level of their own while `vipoly` keeps INFO."""
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("vipoly").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def say(line: str) -> None:
    """One line on the worker's console. Not print(): in Ray Train's workers print is patched to
    also log each line through the root logger, and because Ray wraps the workers' stdout, the
    patch tees it as well, so every printed line reached the console twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Wandb:
    """wandb on rank 0 (offline with no API key); a no-op when disabled or not installed."""

    def __init__(self, mode: str, run_dir: Path, name: str, config: dict, resume_id: str | None = None):
        self.run = None
        if mode == "disabled":
            return
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            mode = "offline"
        import wandb

        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project="vipoly", name=name, dir=str(run_dir), mode=mode, config=config,
                              id=resume_id, resume="allow" if resume_id else None, reinit="finish_previous",
                              # console capture would print every progress line twice
                              settings=wandb.Settings(console="off"))

    @property
    def id(self) -> str | None:
        return self.run.id if self.run else None

    def log(self, row: dict) -> None:
        if self.run:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])

    def finish(self) -> None:
        if self.run:
            self.run.finish()
