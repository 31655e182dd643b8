"""Projection head: pooled vector c (D) → embedding p (out_dim), before L2 normalisation.

p = LN₂(W₂ · GELU(LN₁(W₁ c)))   (SPEC §1), then e = p / ‖p‖₂ outside this module.

The final LayerNorm keeps every output coordinate at a similar scale, which is also what makes
Matryoshka prefixes e[:k] / ‖e[:k]‖ usable. The head computes in float32 even when its parameters or
its input are bf16 (DeepSpeed bf16 casts the whole model): the cast costs nothing at this size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vipoly.model.config import ProjectionConfig


class ProjectionHead(nn.Module):
    def __init__(self, hidden: int, cfg: ProjectionConfig):
        super().__init__()
        width = cfg.hidden_dim or hidden
        self.w1 = nn.Linear(hidden, width)
        self.ln1 = nn.LayerNorm(width)
        self.w2 = nn.Linear(width, cfg.out_dim)
        self.ln2 = nn.LayerNorm(cfg.out_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = _linear(pooled.float(), self.w1)
        x = F.gelu(_layer_norm(x, self.ln1))
        return _layer_norm(_linear(x, self.w2), self.ln2)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight.float(), layer.bias.float())


def _layer_norm(x: torch.Tensor, layer: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, layer.normalized_shape, layer.weight.float(), layer.bias.float(), layer.eps)


def matryoshka(embedding: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The first `dim` coordinates, renormalised: e[:k] / ‖e[:k]‖₂ (None or the full size = unchanged)."""
    if dim is None or dim == embedding.shape[-1]:
        return embedding
    if not 1 <= dim <= embedding.shape[-1]:
        raise ValueError(f"dim={dim} must lie in 1..{embedding.shape[-1]} (the embedding size)")
    return F.normalize(embedding[..., :dim].float(), dim=-1)
