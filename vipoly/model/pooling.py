"""Pooling: the last hidden states H (B, N, D) and the attention mask M (B, N) → one vector per input.

`attention` is the method (SPEC §1); `mean`, `last` and `multihead` are the ablations. Every pooler
returns `(pooled (B, D), weights)` with the weight each token got, so monitoring (pooling entropy)
and the attention visualisation treat all kinds alike. Pooling always computes in float32, whatever
the dtype of the hidden states or of its own parameters: a bf16 softmax over thousands of tokens
loses most of its mass to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vipoly.model.config import PoolingConfig, PoolingKind


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis where mask is true; a_i = exp(u_i)·M_i / Σ_j exp(u_j)·M_j.

    Masked scores are set to the most negative float instead of -inf, so their exp is exactly 0
    in any row with one valid token, and a row with none gives zeros rather than NaN.
    """
    mask = mask.bool()
    scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1) * mask


class AttentionPooling(nn.Module):
    """Learnable-query attention pooling (SPEC §1).

    u_i = h_iᵀ v_a,  a = masked_softmax(u, M),  c = Σ_i a_i h_i,  with v_a ∈ R^D ~ N(0, σ²), σ = 0.02.
    A small σ starts the pooling close to a mean over the valid tokens; training sharpens it.
    """

    def __init__(self, hidden: int, init_std: float = 0.02):
        super().__init__()
        self.context = nn.Parameter(torch.empty(hidden))
        nn.init.normal_(self.context, std=init_std)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden.float()
        weights = masked_softmax(h @ self.context.float(), mask)  # (B, N)
        return torch.einsum("bn,bnd->bd", weights, h), weights


class MultiHeadAttentionPooling(nn.Module):
    """H learnable queries, one per slice of D/H features; the H pooled slices are concatenated.

    For head k with slice h_i^k ∈ R^{D/H}: a^k = masked_softmax(h^k v_k, M), c^k = Σ_i a^k_i h^k_i,
    c = [c^1; …; c^H]. With H = 1 this is `AttentionPooling`. Weights come back as (B, H, N).
    """

    def __init__(self, hidden: int, num_heads: int = 4, init_std: float = 0.02):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"model.pooling.num_heads={num_heads} must divide the hidden size {hidden}")
        self.num_heads = num_heads
        self.context = nn.Parameter(torch.empty(num_heads, hidden // num_heads))
        nn.init.normal_(self.context, std=init_std)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = hidden.shape
        h = hidden.float().view(b, n, self.num_heads, d // self.num_heads)
        scores = torch.einsum("bnkd,kd->bkn", h, self.context.float())
        weights = masked_softmax(scores, mask[:, None, :])  # (B, H, N)
        return torch.einsum("bkn,bnkd->bkd", weights, h).reshape(b, d), weights


class MeanPooling(nn.Module):
    """c = Σ_i M_i h_i / Σ_i M_i; the weights are M / Σ M."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.float()
        weights = m / m.sum(-1, keepdim=True).clamp_min(1.0)
        return torch.einsum("bn,bnd->bd", weights, hidden.float()), weights


class LastTokenPooling(nn.Module):
    """c = h_last, the last position with M = 1 (right or left padding alike); weights are one-hot.

    In a causal model only the last token has attended to the whole input, which is why the
    decoder-based embedders (E5-Mistral, GTE-Qwen) pool there.
    """

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = positions.masked_fill(~mask.bool(), -1).amax(-1).clamp_min(0)  # (B,)
        weights = F.one_hot(last, mask.shape[1]).float() * mask.float()
        return hidden.float()[torch.arange(hidden.shape[0], device=hidden.device), last], weights


def build_pooling(cfg: PoolingConfig, hidden: int) -> nn.Module:
    """The pooler `cfg.kind` names, for hidden size `hidden`."""
    kind = PoolingKind(cfg.kind)
    if kind is PoolingKind.ATTENTION:
        return AttentionPooling(hidden, cfg.init_std)
    if kind is PoolingKind.MULTIHEAD:
        return MultiHeadAttentionPooling(hidden, cfg.num_heads, cfg.init_std)
    if kind is PoolingKind.MEAN:
        return MeanPooling()
    return LastTokenPooling()
