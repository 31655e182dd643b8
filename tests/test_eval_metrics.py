"""Metrics and BM25 against values worked out by hand (the arithmetic is in the comments)."""
from __future__ import annotations

import math
import unicodedata

import numpy as np
import pytest

from vipoly.eval import metrics as M
from vipoly.eval.bm25 import BM25, tokenize

# Three queries over three documents; the gold document of each query sits at rank 2, 3, 3.
RANKED = np.array([[2, 0, 1], [0, 1, 2], [1, 2, 0]])
GOLD = np.array([0, 2, 0])


def test_recall_single_gold():
    assert M.recall_at_k(RANKED, GOLD, 1) == 0.0
    assert M.recall_at_k(RANKED, GOLD, 2) == pytest.approx(1 / 3)
    assert M.recall_at_k(RANKED, GOLD, 3) == 1.0


def test_mrr_single_gold():
    assert M.mrr_at_k(RANKED, GOLD, 3) == pytest.approx((1 / 2 + 1 / 3 + 1 / 3) / 3)  # 7/18
    assert M.mrr_at_k(RANKED, GOLD, 2) == pytest.approx((1 / 2) / 3)  # beyond k counts 0


def test_ndcg_single_gold():
    # one relevant doc: nDCG = 1/log2(rank+1); ranks 2, 3, 3
    expected = (1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(4)) / 3
    assert M.ndcg_at_k(RANKED, GOLD, 3) == pytest.approx(expected)


def test_multiple_relevant():
    ranked = np.array([[3, 1, 0, 2]])
    relevant = [[1, 2]]  # hits at ranks 2 and 4
    assert M.recall_at_k(ranked, relevant, 2) == pytest.approx(0.5)
    assert M.recall_at_k(ranked, relevant, 4) == pytest.approx(1.0)
    assert M.mrr_at_k(ranked, relevant, 4) == pytest.approx(0.5)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert M.ndcg_at_k(ranked, relevant, 4) == pytest.approx(dcg / idcg)
    # at k=1 the ideal list holds one relevant doc, and the first ranked doc is not relevant
    assert M.ndcg_at_k(ranked, relevant, 1) == 0.0


def test_ragged_relevance_and_errors():
    ranked = np.array([[0, 1], [1, 0]])
    assert M.recall_at_k(ranked, [[0], [0, 1]], 1) == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError, match="at least one relevant"):
        M.recall_at_k(ranked, [[0], []], 1)
    with pytest.raises(ValueError, match="2 rankings but 1"):
        M.recall_at_k(ranked, [[0]], 1)


def test_top_k_ties_and_chunks():
    scores = np.array([[0.5, 0.9, 0.5, 0.1]], dtype=np.float32)
    idx, val = M.top_k_of_scores(scores, 3)
    assert idx.tolist() == [[1, 0, 2]]  # the tie 0.5/0.5 goes to the lower index
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(7, 4)).astype(np.float32), rng.normal(size=(11, 4)).astype(np.float32)
    full, _ = M.top_k_of_scores(q @ d.T, 5)
    chunked, _ = M.rank_top_k(q, d, 5, chunk=3)
    assert (full == chunked).all()


def test_spearman_with_ties():
    # ranks of y = [1, 2, 3.5, 5, 3.5]; centred x·y = 8, Σx² = 10, Σy² = 9.5
    assert M.spearman(np.array([1, 2, 3, 4, 5]), np.array([5, 6, 7, 8, 7])) == pytest.approx(8 / math.sqrt(95))
    assert M.spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    assert M.rankdata(np.array([10, 20, 10])).tolist() == [1.5, 3.0, 1.5]


def test_average_precision():
    # positives at ranks 1, 3, 5: (1/1 + 2/3 + 3/5) / 3
    ap = M.average_precision(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 1]))
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # a tie is one threshold: recall 0.5 at P=1, then recall 1 at P=2/3
    assert M.average_precision(np.array([0.9, 0.5, 0.5]), np.array([1, 1, 0])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        M.average_precision(np.array([0.1, 0.2]), np.array([0, 2]))


def test_best_threshold_accuracy():
    # sorted: 0.8(+) 0.4(−) 0.35(+) 0.1(−); cutting below 0.8 gets 3 of 4 right (first best)
    acc, theta = M.best_threshold_accuracy(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert acc == pytest.approx(0.75)
    assert theta == pytest.approx(0.6)
    acc, theta = M.best_threshold_accuracy(np.array([0.2, 0.1]), np.array([0, 0]))
    assert acc == 1.0 and theta > 0.2  # all negative: θ above every score


def test_bitext_accuracy():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.1, 0.7]])
    # rows: 0→0 ✓, 1→0 ✗, 2→2 ✓; columns: each best at its own row
    assert M.nn_accuracy(sim) == pytest.approx((2 / 3, 1.0))
    e = np.eye(3, dtype=np.float32)
    assert M.bitext_accuracy(e, e) == (1.0, 1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        M.bitext_accuracy(e, e[:2])


def test_tokenizer():
    nfd = unicodedata.normalize("NFD", "Đội Thủ của Panthers")
    assert tokenize(nfd) == ["đội", "thủ", "của", "panthers"]
    assert tokenize("黑豹队, NFL's 24") == ["黑", "豹", "队", "黑豹", "豹队", "nfl", "s", "24"]


def test_bm25_hand_values():
    bm = BM25(["a b", "a c c"])  # N=2, lengths 2 and 3, avgdl 2.5, k1=1.5, b=0.75
    idf_a, idf_once = math.log(1 + 0.5 / 2.5), math.log(2)  # df(a)=2, df(b)=df(c)=1
    norm0, norm1 = 1.5 * (0.25 + 0.75 * 2 / 2.5), 1.5 * (0.25 + 0.75 * 3 / 2.5)
    s = bm.scores(["c", "a b", "zzz"])
    assert s[0] == pytest.approx([0.0, idf_once * 2 * 2.5 / (2 + norm1)], rel=1e-6)
    assert s[1] == pytest.approx([(idf_a + idf_once) * 2.5 / (1 + norm0), idf_a * 2.5 / (1 + norm1)], rel=1e-6)
    assert s[2].tolist() == [0.0, 0.0]  # unknown words score nothing
    # repeated query words count once; pair_scores picks the matching diagonal
    assert bm.scores(["c c"])[0] == pytest.approx(s[0])
    assert bm.pair_scores(["c", "a b"], [1, 0]) == pytest.approx([s[0, 1], s[1, 0]], rel=1e-6)
