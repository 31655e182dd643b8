"""Vector tables and search: the index plan and ANN recall@10 against exact search on real NTREX
sentences (the embed → index → search path: test_embed_lance.py)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vipoly.search import IndexConfig, build_index, open_table, plan_index, search


def _ntrex(eval_data, lang: str) -> list[str]:
    name = {"vi": "ref.vie", "en": "src.eng", "zh": "ref.zho-CN"}[lang]
    lines = (eval_data / "ntrex128" / f"newstest2019-{name}.txt").read_text(encoding="utf-8").split("\n")
    return [x for x in lines if x.strip()]


def test_plan_from_row_count():
    cfg = IndexConfig()
    assert plan_index(10_000, 1024, cfg).kind == "exact"
    big = plan_index(1_000_000, 1024, cfg)
    assert big.kind == "ivf_pq" and big.num_partitions == 1000 and big.num_sub_vectors == 64
    assert 16 <= big.nprobes <= big.num_partitions and big.refine_factor > 0
    small = plan_index(2000, 64, IndexConfig(kind="ivf_pq"))
    assert small.num_partitions == 7 and small.num_sub_vectors == 8  # ≥ 256 training rows per partition
    assert plan_index(2000, 64, IndexConfig(kind="ivf_hnsw_sq")).kind == "ivf_hnsw_sq"
    with pytest.raises(ValueError, match="at least 256 rows"):
        plan_index(100, 64, IndexConfig(kind="ivf_pq"))
    with pytest.raises(ValueError, match="index kind 'flat'"):
        plan_index(100, 64, IndexConfig(kind="flat"))


@pytest.fixture(scope="module")
def corpus(eval_data, tiny_model, tmp_path_factory):
    """NTREX Vietnamese + English sentences embedded by the tiny model, in the embed job's Parquet layout."""
    texts = _ntrex(eval_data, "vi")[:1200] + _ntrex(eval_data, "en")[:1200]
    emb = tiny_model.encode(texts, batch_size=64)
    root = tmp_path_factory.mktemp("corpus")
    (root / "emb").mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))],
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
                             "model": ["tiny"] * len(texts), "dim": [emb.shape[1]] * len(texts)}),
                   root / "emb" / "part-0.parquet")
    return root, texts, emb


@pytest.mark.parametrize("kind", ["ivf_pq", "ivf_hnsw_sq"])
def test_ann_recall_at_10_against_exact(corpus, eval_data, tiny_model, kind):
    root, texts, emb = corpus
    # 2400 rows: partitions of ≥ 32 rows so that the search probes only some of them (not all, as ≥ 256 would)
    cfg = IndexConfig(kind=kind, recall_queries=100, rows_per_partition=32)
    report = build_index(root / "emb", str(root / f"db_{kind}"), cfg)
    assert report["rows"] == len(texts) and report["plan"]["kind"] == kind
    assert report["plan"]["nprobes"] < report["plan"]["num_partitions"]
    assert report["recall@10"] >= 0.9, report

    # independently: Chinese sentences as queries, exact top-10 by numpy over the whole corpus
    queries = tiny_model.encode(_ntrex(eval_data, "zh")[:100])
    exact = np.argsort(-(queries @ emb.T), axis=1, kind="stable")[:, :10]
    table, plan = open_table(str(root / f"db_{kind}"))
    hits = search(table, plan, queries, k=10)
    recall = np.mean([len({h["id"] for h in hs} & {f"d{j}" for j in ex}) / 10 for hs, ex in zip(hits, exact)])
    assert recall >= 0.9, recall
    exact_hits = search(table, plan, queries[:10], k=10, exact=True)
    for hs, ex, q in zip(exact_hits, exact, queries):
        assert [h["id"] for h in hs][:3] == [f"d{j}" for j in ex[:3]]
        assert hs[0]["score"] == pytest.approx(float(q @ emb[ex[0]]), abs=1e-4)
