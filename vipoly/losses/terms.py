"""The five loss terms of DLE as small pure functions (SPEC §2).

Inputs are L2-normalised embeddings a, b of shape (B, D): row i of `a` is the query of sample i,
row i of `b` its positive. Every term comes in two forms:

- `infonce(a, b, T)` and friends take the embeddings: the public, self-explanatory form;
- `infonce_sim(...)` and friends take similarities that the caller has already computed. `dle_loss`
  uses these so that all terms share one similarity matrix S = a·bᵀ (the only O(B²·D) work), and so
  that a worker can score its own rows against a gathered global batch (rows R ⊂ columns N).

Per-sample terms return shape (B,) (no reduction), so that the caller can weight each sample by its
task; `margin_rank` couples pairs of samples and returns a scalar. The similarity forms avoid
(R, N) masks and extra (R, N) gradients (the positives and hardest negatives are gathered in one
go, the hardest negative's column comes from a top-2 without gradient): beside the matmul, each
elementwise pass over the B² entries is what DLE adds to the cost of a plain InfoNCE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vipoly.losses.config import TripletNegatives as Negatives  # hardest: max_j a_i·b_j; mean: mean_j of the hinge


def predicted_score(pos: Tensor) -> Tensor:
    """ŝ = (a_i·b_i + 1) / 2 ∈ [0, 1]: the cosine mapped onto the scale of the gold scores."""
    return (pos + 1) / 2


def pair_similarity(a: Tensor, b: Tensor) -> Tensor:
    """a_i·b_i for each row, shape (B,)."""
    return (a * b).sum(dim=-1)


# ---------------------------------------------------------------- InfoNCE
def infonce_sim(sim_ab: Tensor, sim_ba: Tensor | None, targets: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE from similarities.

    sim_ab (R, N): a_i·b_j for R rows i against all N columns j; sim_ba (R, N): b_i·a_j, or None
    when rows and columns are the same batch (then b_i·a_j = S_ji and Sᵀ serves, at no cost);
    targets (R,): the column of each row's positive. Returns (R,):
        NCE_i = ½ [CE(sim_ab[i] / T, targets[i]) + CE(sim_ba[i] / T, targets[i])].
    (van den Oord et al. 2018; symmetric form as in CLIP, Radford et al. 2021.)
    """
    logits_ab = sim_ab / temperature
    logits_ba = logits_ab.T if sim_ba is None else sim_ba / temperature
    return 0.5 * (F.cross_entropy(logits_ab, targets, reduction="none")
                  + F.cross_entropy(logits_ba, targets, reduction="none"))


def infonce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric in-batch InfoNCE, (B, D) × (B, D) → (B,).

    NCE_i = ½ [CE(a_i·bᵀ/T, i) + CE(b_i·aᵀ/T, i)]: sample i's positive against the other B − 1
    samples' positives (a→b) and queries (b→a).
    """
    return infonce_sim(a @ b.T, None, torch.arange(len(a), device=a.device), temperature)


# ---------------------------------------------------------------- graded similarity (text_pair)
def score_mse_pos(pos: Tensor, scores: Tensor) -> Tensor:
    """(ŝ_i − s_i)² with ŝ_i = (pos_i + 1)/2; pos, scores (B,) → (B,)."""
    return (predicted_score(pos) - scores) ** 2


def score_mse(a: Tensor, b: Tensor, scores: Tensor) -> Tensor:
    """Squared error between the predicted score ŝ_i = (a_i·b_i + 1)/2 and the gold s_i ∈ [0, 1], (B,)."""
    return score_mse_pos(pair_similarity(a, b), scores)


def margin_rank_pos(pos: Tensor, scores: Tensor, margin: float, mask: Tensor | None = None) -> Tensor:
    """Margin ranking over ordered pairs, from pos (B,) = a_i·b_i; returns a scalar.

    R = mean over pairs (i, j), both in `mask`, with s_i > s_j (ties are not pairs) of
        max(0, m_r − (ŝ_i − ŝ_j)),
    and R = 0 when there is no such pair. `mask` (B,) bool selects the samples that take part
    (text_pair ones; others may hold NaN scores); None = all.
    """
    if mask is not None:
        # Work on the selected rows only: O(n_sel²) instead of O(B²). The index costs one host
        # sync on a GPU, cheaper than B² masked elementwise passes and their backward.
        keep = mask.nonzero().squeeze(1)
        pos, scores = pos[keep], scores[keep]
    pred = predicted_score(pos)
    pairs = scores[:, None] > scores[None, :]
    hinge = torch.relu(margin - (pred[:, None] - pred[None, :]))
    return (hinge * pairs).sum() / pairs.sum().clamp(min=1)


def margin_rank(a: Tensor, b: Tensor, scores: Tensor, margin: float, mask: Tensor | None = None) -> Tensor:
    """`margin_rank_pos` on ŝ_i = (a_i·b_i + 1)/2: pairs ordered by gold score keep their order by ≥ m_r."""
    return margin_rank_pos(pair_similarity(a, b), scores, margin, mask)


# ---------------------------------------------------------------- cosine (instr)
def cosine_pos(pos: Tensor) -> Tensor:
    """1 − a_i·b_i from pos (B,)."""
    return 1 - pos


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine distance of each pair, 1 − a_i·b_i, (B,): pulls the pair together directly."""
    return cosine_pos(pair_similarity(a, b))


# ---------------------------------------------------------------- triplet (ocr, vqa)
def hardest_negatives(sim_ab: Tensor, targets: Tensor) -> Tensor:
    """Column of each row's hardest negative, argmax_{j ≠ targets[i]} sim_ab[i, j], (R,) long; needs N ≥ 2.

    From the two largest entries of each row (the first unless it is the positive): one pass, no
    (R, N) mask, and no gradient (the caller gathers the value it needs)."""
    top = sim_ab.detach().topk(2, dim=1).indices
    return torch.where(top[:, 0] == targets, top[:, 1], top[:, 0])


def triplet_hinge(pos: Tensor, neg: Tensor, margin: Tensor | float) -> Tensor:
    """max(0, m − a_i·b_i + a_i·b_neg(i)) from pos (R,) and neg (R,) similarities."""
    return torch.relu(margin - pos + neg)


def triplet_sim(sim_ab: Tensor, targets: Tensor, margin: Tensor | float,
                negatives: Negatives | str = Negatives.HARDEST, excluded: Tensor | None = None) -> Tensor:
    """Triplet hinge from similarities: sim_ab (R, N) = a_i·b_j, targets (R,) the positive's column,
    margin a float or (R,) per-row margins. Returns (R,):
        hardest: max(0, m_i − a_i·b_i + max_{j≠i} a_i·b_j)
        mean:    mean_{j≠i} max(0, m_i − a_i·b_i + a_i·b_j)
    A row with no negative (N = 1) gets 0. Columns masked out to −∞ (false negatives) add nothing;
    `excluded` (R,) counts them, so that the mean runs over the row's real negatives.
    """
    negatives = Negatives(negatives)
    margin = torch.as_tensor(margin, dtype=sim_ab.dtype, device=sim_ab.device)
    if sim_ab.shape[1] < 2:
        return sim_ab.new_zeros(len(sim_ab))
    if negatives is Negatives.HARDEST:
        # One gather for the positive and the hardest negative: one (R, N) pass in the backward.
        pos, neg = sim_ab.gather(1, torch.stack([targets, hardest_negatives(sim_ab, targets)], 1)).unbind(1)
        return triplet_hinge(pos, neg, margin)
    pos = sim_ab.gather(1, targets[:, None]).squeeze(1)
    margin = margin.expand(len(sim_ab)) if margin.dim() == 0 else margin
    hinge = torch.relu(margin[:, None] - pos[:, None] + sim_ab)
    # Drop j = i by subtracting its term (= max(0, m_i)) rather than masking: exact in value and gradient.
    own = hinge.gather(1, targets[:, None]).squeeze(1)
    count = sim_ab.shape[1] - 1 - (0 if excluded is None else excluded)
    return (hinge.sum(dim=1) - own) / torch.as_tensor(count, dtype=sim_ab.dtype, device=sim_ab.device).clamp(min=1)


def triplet(a: Tensor, b: Tensor, margin: Tensor | float,
            negatives: Negatives | str = Negatives.HARDEST) -> Tensor:
    """Triplet loss against in-batch negatives b_j (j ≠ i), (B,); see `triplet_sim`.
    (Schroff et al. 2015; hardest in-batch negative as in VSE++, Faghri et al. 2018.)"""
    return triplet_sim(a @ b.T, torch.arange(len(a), device=a.device), margin, negatives)
