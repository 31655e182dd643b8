"""Losses over L2-normalised embeddings: the five terms, their DLE composition, cross-worker gathering.

- `terms`: InfoNCE, score MSE, margin ranking, cosine, triplet (pure functions, formulas in docstrings);
- `dle`: `dle_loss` (the per-task mix, L = (1/B) Σ_i λ_{t(i)} ℓ_i) and `DLEStats`; Matryoshka variant;
- `gather`: `gather_with_grad` and `global_dle_loss` (negatives from every worker, DDP-correct scaling);
- `config`: the `loss.*` config section (no torch: names here are imported on first use).
"""
from vipoly.lazy import lazy_names

_WHERE = {
    "TERMS": "dle", "DLEStats": "dle", "GlobalBatch": "dle", "dle_loss": "dle", "matryoshka_dle_loss": "dle",
    "gather_with_grad": "gather", "global_dle_loss": "gather", "reduce_stats": "gather",
    "cosine": "terms", "infonce": "terms", "margin_rank": "terms", "predicted_score": "terms",
    "score_mse": "terms", "triplet": "terms",
}
__all__ = list(_WHERE)
__getattr__ = lazy_names(__name__, _WHERE)
