"""Strategic Task Weighting (STW): the λ_t that multiply each task's loss (SPEC §3).

Modes (`STWConfig.mode`):
- none:    λ_t = 1 for every task (equal weights: the hard baseline of multi-task studies);
- static:  SPEC's table, `static_epoch0` in epoch 0 and `static_later` from epoch 1 on;
- dynamic: λ_t = (ℓ̄ / ℓ_t) · α_t · β(epoch), with ℓ_t task t's mean raw loss over the last window,
           ℓ̄ the mean of ℓ_t over the tasks present, β(0) = beta_foundation, β(≥1) = beta_balance.
           Tasks that lag (ℓ_t > ℓ̄) get less weight, α_t sets each task's priority.
           Before the first update, and whenever fewer than `min_tasks` tasks were seen in a window,
           the weights stay where they were (the static table before any update); a task absent
           from a window keeps its previous λ_t. `clamp` optionally bounds each λ_t.

`TaskWeighter` = a weight rule (one class per mode, in `RULES`, so uncertainty weighting or FAMO
can be added behind the same interface) + a loss window shared by all rules. The training loop
(`vipoly.train.loop.run_training`) uses it so, once per optimizer step:

    lam = weighter.as_tensor(epoch).to(device)      # → dle_loss, for every micro-batch of the step
    ...                                             # train_step: the per-task stats are summed over
                                                    # the workers (reduce_stats) before they come here
    if dynamic updates are on (train.dynamic_from_phase):
        if the step's loss was finite:
            weighter.observe(global_stats)          # sample-weighted loss sums per task
        if weighter.due(step) and weighter.window_losses():
            weighter.update_from_window(epoch)      # new λ from the window's means, window cleared

Every rank observes the same globally summed stats and applies the same deterministic update, so all
ranks hold identical λ without broadcasting them. (`window()` and `update_from_window(epoch, w)`
also take a window summed by the caller, for a loop that observes per-rank stats.)
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from vipoly.stw.config import STWConfig, STWMode
from vipoly.losses.dle import DLEStats
from vipoly.tasks import TASKS


def _check_losses(task_losses: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for task, value in task_losses.items():
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} in task losses; expected one of {', '.join(TASKS)}")
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"task loss for {task!r} must be finite and > 0, got {value}")
        out[task] = value
    return out


def _check_epoch(epoch: int) -> int:
    if epoch < 0:
        raise ValueError(f"epoch must be ≥ 0, got {epoch}")
    return epoch


# ---------------------------------------------------------------- weight rules
class WeightRule:
    """One way to set λ_t. Subclasses register under a `STWMode` value in `RULES`."""

    mode: ClassVar[STWMode]

    def __init__(self, cfg: STWConfig):
        self.cfg = cfg

    def static(self, epoch: int) -> dict[str, float]:
        """SPEC's per-epoch table (also the fallback of adaptive rules)."""
        return dict(self.cfg.static_epoch0 if _check_epoch(epoch) == 0 else self.cfg.static_later)

    def weights(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def update(self, task_losses: dict[str, float], epoch: int) -> dict[str, float]:
        """Consume validated mean raw losses of the tasks seen in a window; return all λ_t."""
        return self.weights(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


RULES: dict[STWMode, type[WeightRule]] = {}


def register(cls: type[WeightRule]) -> type[WeightRule]:
    RULES[cls.mode] = cls
    return cls


@register
class EqualWeights(WeightRule):
    mode = STWMode.NONE

    def weights(self, epoch: int) -> dict[str, float]:
        _check_epoch(epoch)
        return {t: 1.0 for t in TASKS}


@register
class StaticWeights(WeightRule):
    mode = STWMode.STATIC

    def weights(self, epoch: int) -> dict[str, float]:
        return self.static(epoch)


@register
class DynamicWeights(WeightRule):
    """λ_t = (ℓ̄ / ℓ_t) · α_t · β(epoch) over the tasks present (module docstring)."""

    mode = STWMode.DYNAMIC

    def __init__(self, cfg: STWConfig):
        super().__init__(cfg)
        self.current: dict[str, float] | None = None  # None until the first successful update
        self.updates = 0

    def beta(self, epoch: int) -> float:
        return self.cfg.beta_foundation if _check_epoch(epoch) == 0 else self.cfg.beta_balance

    def weights(self, epoch: int) -> dict[str, float]:
        return dict(self.current) if self.current is not None else self.static(epoch)

    def update(self, task_losses: dict[str, float], epoch: int) -> dict[str, float]:
        if len(task_losses) < self.cfg.min_tasks:
            return self.weights(epoch)  # too little evidence: keep what we have
        mean = sum(task_losses.values()) / len(task_losses)
        beta = self.beta(epoch)
        new = self.weights(epoch)  # absent tasks keep their previous λ
        for task, loss in task_losses.items():
            lam = mean / loss * self.cfg.alpha[task] * beta
            if self.cfg.clamp is not None:
                lam = min(max(lam, self.cfg.clamp[0]), self.cfg.clamp[1])
            new[task] = lam
        self.current = new
        self.updates += 1
        return dict(new)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        current = state.get("current")
        if current is not None:
            missing = set(TASKS) - set(current)
            if missing:
                raise ValueError(f"STW state: weights missing task(s) {sorted(missing)}")
            current = {t: float(current[t]) for t in TASKS}
        self.current = current
        self.updates = int(state.get("updates", 0))


# ---------------------------------------------------------------- the weighter
class TaskWeighter:
    """λ_t for `dle_loss`: a `WeightRule` chosen by `cfg.mode`, plus the window of observed losses."""

    def __init__(self, cfg: STWConfig | None = None):
        self.cfg = cfg or STWConfig()
        if self.cfg.clamp is not None and not 0 < self.cfg.clamp[0] <= self.cfg.clamp[1]:
            raise ValueError(f"stw.clamp must be (low, high) with 0 < low ≤ high, got {self.cfg.clamp}")
        self.rule = RULES[STWMode(self.cfg.mode)](self.cfg)
        self._window: Tensor | None = None  # (2, 5) float64 [sums; counts], on the observed stats' device

    @property
    def mode(self) -> STWMode:
        return self.rule.mode

    # -- weights
    def weights(self, epoch: int) -> dict[str, float]:
        """Current {task: λ_t} for all five tasks."""
        return self.rule.weights(epoch)

    def static_weights(self, epoch: int) -> dict[str, float]:
        """SPEC's table for this epoch, whatever the mode (e.g. before dynamic updates are switched on)."""
        return self.rule.static(epoch)

    def as_tensor(self, epoch: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
        """λ_t as a (5,) tensor in TASKS order: the `task_weights` argument of `dle_loss`."""
        w = self.weights(epoch)
        return torch.tensor([w[t] for t in TASKS], dtype=dtype, device=device)

    def update(self, task_losses: Mapping[str, float], epoch: int) -> dict[str, float]:
        """Update from {task: mean raw loss} of the tasks seen (any subset); return all λ_t.
        Unknown task names and non-finite or ≤ 0 losses raise ValueError."""
        return self.rule.update(_check_losses(task_losses), _check_epoch(epoch))

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) ends a window of `cfg.update_every` steps."""
        return step > 0 and step % self.cfg.update_every == 0

    # -- the window
    def observe(self, stats: DLEStats | Mapping[str, float], counts: Mapping[str, float] | None = None) -> None:
        """Add one batch to the window, weighting each task's mean loss by its sample count.

        `stats`: a `DLEStats` (its per-task sums and counts are used, on their device, no host
        sync), or {task: mean raw loss} with `counts` {task: samples} (1 each when None)."""
        if isinstance(stats, DLEStats):
            sums, cnt = stats.task_sum.detach(), stats.task_count.detach()
        else:
            losses = {t: float(v) for t, v in stats.items()}
            unknown = set(losses) - set(TASKS) | set(counts or {}) - set(TASKS)
            if unknown:
                raise ValueError(f"unknown task(s) {sorted(unknown)} in observed losses; expected {list(TASKS)}")
            device = self._window.device if self._window is not None else "cpu"
            n = [float((counts or {}).get(t, 1.0)) if t in losses else 0.0 for t in TASKS]
            sums = torch.tensor([losses.get(t, 0.0) * k for t, k in zip(TASKS, n)], dtype=torch.float64, device=device)
            cnt = torch.tensor(n, dtype=torch.float64, device=device)
        batch = torch.stack([sums, cnt]).to(torch.float64)
        if batch.shape != (2, len(TASKS)):
            raise ValueError(f"observed stats must have one entry per task {TASKS}, got shape {tuple(batch.shape)}")
        self._window = batch.clone() if self._window is None else self._window + batch.to(self._window.device)

    def window(self) -> Tensor:
        """A copy of the window, (2, 5) float64: row 0 the loss sums, row 1 the sample counts, in
        TASKS order (zeros when empty). All-reduce it (SUM) across workers, then pass it to
        `update_from_window`."""
        if self._window is None:
            return torch.zeros(2, len(TASKS), dtype=torch.float64)
        return self._window.clone()

    def window_losses(self, window: Tensor | None = None) -> dict[str, float]:
        """{task: mean raw loss} over the tasks with samples in the window."""
        sums, counts = (self.window() if window is None else window).tolist()
        return {t: s / n for t, s, n in zip(TASKS, sums, counts) if n > 0}

    def update_from_window(self, epoch: int, window: Tensor | None = None) -> dict[str, float]:
        """Update from the window (this worker's, or the all-reduced `window` given), then clear it."""
        losses = self.window_losses(window)
        self._window = None
        return self.update(losses, epoch)

    def clear_window(self) -> None:
        self._window = None

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON-friendly): mode, the rule's state (under "strategy", the key
        checkpoints hold) and the open window."""
        return {"mode": self.mode.value, "strategy": self.rule.state_dict(),
                "window": None if self._window is None else self._window.cpu().tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mode") != self.mode.value:
            raise ValueError(f"STW state was saved in mode {state.get('mode')!r}, this weighter is {self.mode.value!r}")
        self.rule.load_state_dict(state.get("strategy") or {})
        window = state.get("window")
        self._window = None if window is None else torch.tensor(window, dtype=torch.float64)
