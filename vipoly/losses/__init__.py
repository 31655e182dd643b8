"""Losses over L2-normalised embeddings: the five terms, their DLE composition, cross-worker gathering.

- `terms`: InfoNCE, score MSE, margin ranking, cosine, triplet (pure functions, formulas in docstrings);
- `dle`: `dle_loss` (the per-task mix, L = (1/B) Σ_i λ_{t(i)} ℓ_i) and `DLEStats`; Matryoshka variant;
- `gather`: `gather_with_grad` and `global_dle_loss` (negatives from every worker, DDP-correct scaling).
"""
from vipoly.losses.dle import TERMS, DLEStats, GlobalBatch, dle_loss, matryoshka_dle_loss
from vipoly.losses.gather import gather_with_grad, global_dle_loss, reduce_stats
from vipoly.losses.terms import cosine, infonce, margin_rank, predicted_score, score_mse, triplet

__all__ = ["TERMS", "DLEStats", "GlobalBatch", "cosine", "dle_loss", "gather_with_grad", "global_dle_loss",
           "infonce", "margin_rank", "matryoshka_dle_loss", "predicted_score", "reduce_stats", "score_mse", "triplet"]
