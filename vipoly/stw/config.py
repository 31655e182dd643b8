"""Strategic Task Weighting's config section (`stw.*`, SPEC §3)."""
from __future__ import annotations

import enum

from pydantic import Field, field_validator

from vipoly.section import Section, all_tasks
from vipoly.tasks import TASKS


class STWMode(str, enum.Enum):
    NONE = "none"  # all λ_t = 1
    STATIC = "static"  # SPEC's per-epoch table
    DYNAMIC = "dynamic"  # λ_t = (ℓ̄/ℓ_t)·α_t·β(epoch)


class STWConfig(Section):
    mode: STWMode = STWMode.DYNAMIC
    """none | static | dynamic (SPEC §3; dynamic is the method, none the equal-weights baseline)."""
    alpha: dict[str, float] = {"text_pair": 0.27, "instr": 1.25, "ocr": 1.0, "vqa_single": 1.0, "vqa_multi": 1.0}
    """α_t, each task's priority (SPEC §3's reference values; ranges text_pair 0.25–0.35, instr 1.1–1.3,
    others 0.9–1.2)."""
    beta_foundation: float = Field(1.05, gt=0)
    """β in epoch 0, "foundation" (SPEC §3: 1.05, range 1.0–1.2)."""
    beta_balance: float = Field(0.95, gt=0)
    """β from epoch 1 on, "balance" (SPEC §3: 0.95, range 0.8–1.0)."""
    static_epoch0: dict[str, float] = {"text_pair": 0.25, "instr": 1.2, "ocr": 1.0, "vqa_single": 1.0, "vqa_multi": 0.8}
    """λ_t in epoch 0 for static mode, and the fallback before any dynamic update (SPEC §3)."""
    static_later: dict[str, float] = {"text_pair": 0.22, "instr": 1.3, "ocr": 1.2, "vqa_single": 1.0, "vqa_multi": 0.8}
    """λ_t from epoch 1 on for static mode (SPEC §3)."""
    update_every: int = Field(10, ge=1)
    """K: optimizer steps between dynamic updates (SPEC §3: the reference tested down to K = 5)."""
    min_tasks: int = Field(2, ge=1, le=len(TASKS))
    """Tasks a window must have seen for an update; fewer → keep the current weights (SPEC §3)."""
    clamp: tuple[float, float] | None = None
    """Optional (low, high) bound on each dynamic λ_t; off by default as in the SPEC."""

    @field_validator("alpha", "static_epoch0", "static_later")
    @classmethod
    def _complete(cls, v: dict[str, float], info) -> dict[str, float]:
        return all_tasks(v, f"stw.{info.field_name}")
