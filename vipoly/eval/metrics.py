"""Ranking, correlation and classification metrics over embeddings, in plain numpy.

Retrieval metrics take the ranked document indices of each query (best first) and the set of
relevant documents of each query, so one function serves the single-gold case (XQuAD: a question
has one paragraph) and the several-gold case (canonical shards where one query has many positives).
Relevance is binary. Ties in scores are broken by document index (a stable sort), so results are
deterministic.

Definitions, for a query q with relevant set R_q and ranking d_1, d_2, ...:
  Recall@k = |R_q ∩ {d_1..d_k}| / |R_q|
  MRR@k    = 1 / (rank of the first relevant d_i, i ≤ k), 0 if none in the top k
  nDCG@k   = DCG@k / IDCG@k, DCG@k = Σ_{i≤k} rel_i / log2(i + 1), IDCG@k = Σ_{i≤min(|R_q|,k)} 1 / log2(i + 1)
each averaged over queries.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Relevant = Sequence[Sequence[int]] | np.ndarray


# ------------------------------------------------------------------ ranking
def rank_top_k(queries: np.ndarray, docs: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k highest dot products `queries @ docs.T`, best first.

    Works in query chunks so a large corpus never needs the whole (Q, N) matrix at once.
    """
    k = min(k, docs.shape[0])
    idx = np.empty((queries.shape[0], k), dtype=np.int64)
    val = np.empty((queries.shape[0], k), dtype=np.float32)
    for s in range(0, queries.shape[0], chunk):
        scores = queries[s:s + chunk] @ docs.T
        idx[s:s + chunk], val[s:s + chunk] = top_k_of_scores(scores, k)
    return idx, val


def top_k_of_scores(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of each row of a (Q, N) score matrix, best first, ties by lower index."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def _relevant_matrix(relevant: Relevant) -> np.ndarray:
    """(Q, R_max) int matrix of relevant indices padded with -1 (never a document index)."""
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1:
        return relevant.astype(np.int64)[:, None]
    rows = [np.asarray(list(r), dtype=np.int64) for r in relevant]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every query needs at least one relevant document")
    out = np.full((len(rows), max(len(r) for r in rows)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def hits_matrix(ranked: np.ndarray, relevant: Relevant) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) booleans "the i-th ranked document is relevant", and (Q,) counts |R_q|."""
    rel = _relevant_matrix(relevant)
    if rel.shape[0] != ranked.shape[0]:
        raise ValueError(f"{ranked.shape[0]} rankings but {rel.shape[0]} relevance sets")
    hits = (ranked[:, :, None] == rel[:, None, :]).any(-1)
    return hits, (rel >= 0).sum(1)


def recall_at_k(ranked: np.ndarray, relevant: Relevant, k: int) -> float:
    hits, n_rel = hits_matrix(ranked[:, :k], relevant)
    return float(np.mean(hits.sum(1) / n_rel))


def mrr_at_k(ranked: np.ndarray, relevant: Relevant, k: int) -> float:
    hits, _ = hits_matrix(ranked[:, :k], relevant)
    first = np.where(hits.any(1), hits.argmax(1) + 1, np.inf)
    return float(np.mean(1.0 / first))


def ndcg_at_k(ranked: np.ndarray, relevant: Relevant, k: int) -> float:
    hits, n_rel = hits_matrix(ranked[:, :k], relevant)
    discount = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))
    dcg = (hits * discount).sum(1)
    ideal_cum = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
    idcg = ideal_cum[np.minimum(n_rel, k)]
    return float(np.mean(dcg / idcg))


def retrieval_metrics(ranked: np.ndarray, relevant: Relevant, ks: Sequence[int] = (1, 5, 10),
                      cutoff: int = 10) -> dict[str, float]:
    """R@k for each k, plus MRR@cutoff and nDCG@cutoff (the usual retrieval report row)."""
    out = {f"R@{k}": recall_at_k(ranked, relevant, k) for k in ks}
    out[f"MRR@{cutoff}"] = mrr_at_k(ranked, relevant, cutoff)
    out[f"nDCG@{cutoff}"] = ndcg_at_k(ranked, relevant, cutoff)
    return out


# ------------------------------------------------------------------ correlation / classification
def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the mean of the ranks they span (as Spearman needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    # boundaries of runs of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # mean of ranks s+1 .. e
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """ρ = Pearson correlation of the tie-averaged ranks of x and y."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two equal-length arrays of ≥ 2 values, got {len(x)} and {len(y)}")
    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def _check_binary(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be equal-length vectors")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return scores, labels.astype(np.int64)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP = Σ_n (R_n − R_{n−1}) · P_n over the distinct score thresholds, highest first.

    Equal scores form one threshold (no arbitrary order among ties); with distinct scores this is
    the mean of precision@rank over the positives' ranks.
    """
    scores, labels = _check_binary(scores, labels)
    n_pos = labels.sum()
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive label")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_run = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_run]
    seen = (np.arange(1, len(s) + 1))[last_of_run]
    precision = tp / seen
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float((recall_gain * precision).sum())


def best_threshold_accuracy(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best accuracy of "positive iff score ≥ θ" over all θ, and that θ.

    Candidate θ are the distinct scores (and +∞, "all negative"); the returned θ is the midpoint
    between the chosen score and the next lower one, a threshold that transfers to new data.
    """
    scores, labels = _check_binary(scores, labels)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    n_neg = len(y) - y.sum()
    last_of_run = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_run]
    fp = np.cumsum(1 - y)[last_of_run]
    correct = np.r_[n_neg, tp + (n_neg - fp)]  # first entry: θ above every score
    best = int(np.argmax(correct))
    run_values = s[last_of_run]
    if best == 0:
        theta = float(run_values[0]) + 1e-6
    elif best == len(run_values):
        theta = float(run_values[-1])
    else:
        theta = float((run_values[best - 1] + run_values[best]) / 2)
    return float(correct[best] / len(y)), theta


def bitext_accuracy(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Nearest-neighbour accuracy both ways for line-aligned, normalised embeddings.

    a→b: the share of i whose most similar row of b is b_i; b→a likewise. Ties go to the lower
    index (argmax), which favours no particular line.
    """
    if a.shape != b.shape:
        raise ValueError(f"bitext sides differ in shape: {a.shape} vs {b.shape}")
    return nn_accuracy(a @ b.T)


def nn_accuracy(sim: np.ndarray) -> tuple[float, float]:
    """Row-wise and column-wise "the best match of i is i" rates of a square similarity matrix."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"need a square similarity matrix, got {sim.shape}")
    truth = np.arange(len(sim))
    return float(np.mean(sim.argmax(1) == truth)), float(np.mean(sim.argmax(0) == truth))
