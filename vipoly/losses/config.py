"""The loss's config section (`loss.*`): DLE's per-task recipe (SPEC §2), temperature, negatives."""
from __future__ import annotations

import enum

from pydantic import Field, field_validator

from vipoly.section import Section, per_task


class TripletNegatives(str, enum.Enum):
    HARDEST = "hardest"
    MEAN = "mean"


class LossKind(str, enum.Enum):
    DLE = "dle"  # per-task mixes (SPEC §2)
    INFONCE = "infonce"  # ablation: one InfoNCE for every task


class LossConfig(Section):
    kind: LossKind = LossKind.DLE
    """dle: SPEC §2's per-task recipes; infonce: one InfoNCE for every task (the ablation)."""
    temperature: float = Field(0.07, gt=0)
    """InfoNCE temperature T (SPEC §2: 0.07; the reference run used 0.2, the sweep covers both)."""
    lambda_score: float = Field(20.0, ge=0)
    """λ_score: weight of the score MSE on text pairs (SPEC §2: 20)."""
    lambda_rank: float = Field(7.0, ge=0)
    """λ_rank: weight of the margin ranking loss on text pairs (SPEC §2: 7)."""
    rank_margin: float = Field(0.05, ge=0)
    """m_r: margin of the ranking loss, in cosine units (SPEC §2: 0.05)."""
    lambda_triplet: dict[str, float] = {"ocr": 1.0, "vqa_single": 1.0, "vqa_multi": 1.5}
    """λ_trip per triplet task (SPEC §2: ocr 1.0, vqa_single 1.0, vqa_multi 1.5)."""
    triplet_margin: dict[str, float] = {"ocr": 0.2, "vqa_single": 0.2, "vqa_multi": 0.3}
    """Margin m per triplet task, in cosine units (SPEC §2: ocr 0.2, vqa_single 0.2, vqa_multi 0.3)."""
    triplet_negatives: TripletNegatives = TripletNegatives.HARDEST
    """Which in-batch negative the triplet hinge uses: the hardest (default), or another rule."""
    gather_negatives: bool = True
    """Use the whole global batch (all workers, with gradients) as InfoNCE/triplet negatives."""
    mask_duplicates: bool = True
    """Never use a positive as a negative of a row whose own positive has the same text and image
    bytes (VQA answers "yes" twice in a batch, two questions on one paragraph): masked out of
    InfoNCE (both directions) and the triplet term. `masked_pairs` in metrics.jsonl counts them."""

    @field_validator("lambda_triplet", "triplet_margin")
    @classmethod
    def _known(cls, v: dict[str, float], info) -> dict[str, float]:
        return per_task(v, f"loss.{info.field_name}")
