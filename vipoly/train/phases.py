"""Training phases (SPEC §4): exploration → stabilization → optimization, by optimizer step.

Fresh heads (pooling, projection) settle during exploration; `train.dynamic_from_phase` decides
from which phase dynamic STW updates apply (static weights before it).
"""
from __future__ import annotations

from vipoly.train.config import TrainConfig

PHASES = ("exploration", "stabilization", "optimization")


def phase_of(step: int, cfg: TrainConfig) -> str:
    first, second = cfg.phases
    if step < first:
        return PHASES[0]
    return PHASES[1] if step < second else PHASES[2]


def dynamic_stw_active(step: int, cfg: TrainConfig) -> bool:
    return PHASES.index(phase_of(step, cfg)) >= PHASES.index(cfg.dynamic_from_phase)


def is_checkpoint_step(step: int, cfg: TrainConfig) -> tuple[bool, bool]:
    """(save now, is strategic) after `step` optimizer steps have completed."""
    strategic = step in cfg.checkpoint.strategic
    return strategic or step % cfg.checkpoint.every == 0, strategic
