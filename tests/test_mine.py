"""Hard-negative mining on real questions (XQuAD vi, two articles): the Ray Data embedding job,
exact search, positive-aware filtering, copies of the shards, resume; and the filter alone."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import mine
from vipoly.data.shards import task_sources


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, eval_data):
    from vipoly.data.converters import ConvertOptions
    from vipoly.data.prepare import prepare

    doc = json.loads((eval_data / "xquad" / "xquad.vi.json").read_text())
    root = tmp_path_factory.mktemp("mine")
    small = root / "xquad.vi.json"
    small.write_text(json.dumps({"data": doc["data"][:2]}, ensure_ascii=False))  # ~80 questions
    prepare("squad", [str(small)], root / "prepared", ConvertOptions(lang="vi"), rows_per_file=30)
    return root / "prepared"


def test_mined_copies_hold_filtered_negatives_and_a_rerun_skips(prepared, tmp_path, ray_session, tiny_model_dir,
                                                                 capsys):
    out = tmp_path / "mined"
    argv = ["--model", str(tiny_model_dir), "--data", str(prepared), "--out", str(out), "--negatives", "3",
            "--depth", "10"]
    assert mine.main(argv) == 0
    report = json.loads((out / mine.REPORT).read_text())["instr"]
    originals, copies = task_sources(prepared)["instr"], task_sources(out)["instr"]
    assert [f.rsplit("/", 1)[1] for f in originals] == [f.rsplit("/", 1)[1] for f in copies]
    before = pq.read_table(originals).to_pylist()
    after = pq.read_table(copies).to_pylist()
    assert [r["id"] for r in after] == [r["id"] for r in before] and report["rows"] == len(after)
    for a, b in zip(after, before):
        assert {k: v for k, v in a.items() if k != "neg_text"} == {k: v for k, v in b.items() if k != "neg_text"}
        assert a["pos_text"] not in a["neg_text"] and len(a["neg_text"]) <= 3
        assert len(set(a["neg_text"])) == len(a["neg_text"])
    positives = {r["pos_text"] for r in before}
    assert all(n in positives for r in after for n in r["neg_text"])  # mined among the set's positives
    assert sum(len(r["neg_text"]) for r in after) == report["negatives"] > 0
    assert report["candidates"] == report["rows"] * 10
    # Questions on one paragraph share its text: those candidates were dropped, never kept.
    assert report["dropped_identical"] > 0
    assert "dropped as likely false negatives" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["mined"]["negatives"] == 3

    assert mine.main(argv) == 0
    assert "already mined" in capsys.readouterr().out


def test_positive_aware_filter():
    """Row 0's own positive scores 0.8: a candidate at 0.79 (above 0.95 × 0.8) is a likely false
    negative, one with its own text is dropped, an image positive is no text negative."""
    q = np.array([[1.0, 0.0]], dtype=np.float32).repeat(5, 0)
    scores = [0.8, 0.79, 0.7, 0.6, 0.5]
    p = np.array([[s, (1 - s * s) ** 0.5] for s in scores], dtype=np.float32)
    texts = ["own", "near", "own", None, "far"]
    negatives, counts = mine.select(q, p, texts, n=2, depth=4, margin=0.95)
    assert negatives[0] == ["far"]
    assert counts["dropped_false_negative"] >= 1 and counts["dropped_identical"] >= 1
    assert counts["skipped_not_text"] >= 1
    with pytest.raises(ValueError, match="--out must differ"):
        mine.run(mine.build_parser().parse_args(["--model", ".", "--data", ".", "--out", ".", "--negatives", "1"]))


def test_hnsw_search_finds_what_exact_search_finds():
    """--index hnsw (FAISS) against exact search on 3,000 unit vectors: recall@10 on a sample, and
    the negatives written (the positive-aware filter on either search's candidates)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3000, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p = q + 0.2 * rng.standard_normal(q.shape).astype(np.float32)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    texts = [f"row {i}" for i in range(len(q))]
    exact, exact_counts = mine.select(q, p, texts, n=3, depth=10, margin=0.95)
    approx, approx_counts = mine.select(q, p, texts, n=3, depth=10, margin=0.95, index="hnsw")
    assert approx_counts["recall"] >= 0.95 and "recall" not in exact_counts  # on 1,000 sampled rows
    assert np.mean([a == b for a, b in zip(exact, approx)]) >= 0.95
    assert approx_counts["candidates"] == exact_counts["candidates"] == 30_000
    assert all(f"row {i}" not in negs for i, negs in enumerate(approx))  # never the row's own positive
    assert approx_counts["negatives"] > 0
