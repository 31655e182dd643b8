"""Okapi BM25, the lexical bar every retrieval report shows beside the model.

score(q, d) = Σ_{t ∈ q} idf(t) · tf(t,d)·(k1 + 1) / (tf(t,d) + k1·(1 − b + b·|d|/avgdl))
idf(t)      = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))      (never negative, as in Lucene)
with k1 = 1.5, b = 0.75. Query terms count once each (a repeated query word does not weigh more).

The tokenizer is deliberately simple and language-agnostic: NFC, lower case, runs of word
characters. Vietnamese writes one syllable per space-separated token, so word runs are syllables,
which is what Vietnamese BM25 baselines usually index. Chinese has no spaces: each run of Han
characters becomes its character unigrams plus bigrams, a standard stand-in for word segmentation.

The index is a sparse (docs × vocab) matrix of per-term BM25 weights, so scoring every query
against every document is one sparse matrix product.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
from scipy import sparse

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"(?P<han>[{_HAN}]+)|(?P<word>[^\W{_HAN}]+)")


def tokenize(text: str) -> list[str]:
    """NFC + lower-case word runs; Han runs become character unigrams and bigrams."""
    out: list[str] = []
    for m in _TOKEN.finditer(unicodedata.normalize("NFC", text).lower()):
        run = m.group("han")
        if run is None:
            out.append(m.group("word"))
        else:
            out.extend(run)
            out.extend(run[i:i + 2] for i in range(len(run) - 1))
    return out


class BM25:
    """An in-memory BM25 index over a list of documents."""

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.vocab: dict[str, int] = {}
        rows, cols, tfs = [], [], []
        lengths = np.zeros(len(docs), dtype=np.float64)
        for d, text in enumerate(docs):
            tokens = tokenize(text)
            lengths[d] = len(tokens)
            for term, tf in Counter(tokens).items():
                rows.append(d)
                cols.append(self.vocab.setdefault(term, len(self.vocab)))
                tfs.append(tf)
        n_docs = len(docs)
        rows_a, cols_a, tf_a = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), np.array(tfs, dtype=np.float64)
        df = np.bincount(cols_a, minlength=len(self.vocab)).astype(np.float64)
        self.idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
        avgdl = lengths.mean() if n_docs and lengths.mean() > 0 else 1.0
        norm = self.k1 * (1 - self.b + self.b * lengths[rows_a] / avgdl)
        weights = self.idf[cols_a] * tf_a * (self.k1 + 1) / (tf_a + norm)
        # (vocab × docs), so that query_matrix @ self._w gives (queries × docs)
        self._w = sparse.csr_matrix((weights, (cols_a, rows_a)), shape=(len(self.vocab), n_docs))

    def _query_matrix(self, queries: Iterable[str]) -> sparse.csr_matrix:
        rows, cols = [], []
        n = 0
        for q, text in enumerate(queries):
            n += 1
            for term in set(tokenize(text)):
                j = self.vocab.get(term)
                if j is not None:  # a term no document holds adds nothing to any score
                    rows.append(q)
                    cols.append(j)
        data = np.ones(len(rows), dtype=np.float64)
        return sparse.csr_matrix((data, (rows, cols)), shape=(n, len(self.vocab)))

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """(n_queries, n_docs) dense BM25 scores."""
        return np.asarray((self._query_matrix(queries) @ self._w).todense(), dtype=np.float32)

    def pair_scores(self, queries: Sequence[str], doc_ids: Sequence[int]) -> np.ndarray:
        """score(queries[i], docs[doc_ids[i]]) for each i, without the full matrix."""
        q = self._query_matrix(queries)
        w = self._w[:, np.asarray(doc_ids, dtype=np.int64)]  # (vocab × n) column i = doc of query i
        return np.asarray(q.multiply(w.T).sum(1)).ravel().astype(np.float32)
