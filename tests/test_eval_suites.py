"""Every evaluation suite on the real files of ../shared/data/eval, through the CLI, on the tiny model.

The tiny model is random, so these tests check structure, counts and ranges, not quality; BM25's
numbers are the quality check that is possible here (it must find XQuAD's paragraphs).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipelines import evaluate
from vipoly.config import load_config
from vipoly.data.schema import make_row, rows_to_table
from vipoly.eval import data as D
from vipoly.eval.bm25 import BM25
from vipoly.eval.loading import effective_model_config, inference_overrides, load_for_inference
from vipoly.eval.metrics import retrieval_metrics, top_k_of_scores
from vipoly.eval.suites import parse_suite

LIMIT = 24


def _png(text: str) -> bytes:
    img = Image.new("RGB", (64, 40), "white")
    ImageDraw.Draw(img).text((2, 12), text[:12], fill="black")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _canonical(root: Path, eval_data: Path) -> dict[str, int]:
    """Shards built from real text: text_pair rows (XQuAD question → paragraph, vi and en; many
    questions share a paragraph) and ocr rows (a rendered NTREX line → its text)."""
    rows = []
    for lang in ("vi", "en"):
        sq = D.load_squad(eval_data / "xquad" / f"xquad.{lang}.json")
        for i in range(12):
            rows.append(make_row(id=f"{lang}{i}", task="text_pair", lang=lang, query_text=sq.questions[i],
                                 pos_text=sq.paragraphs[sq.paragraph_of[i]], score=1.0))
    (root / "text_pair").mkdir(parents=True)
    pq.write_table(rows_to_table(rows), root / "text_pair" / "part-00000.parquet")
    en = D.load_lines(eval_data / "ntrex128" / "newstest2019-src.eng.txt")[:10]
    ocr = [make_row(id=f"o{i}", task="ocr", lang="en", query_images=[_png(t)], pos_text=t) for i, t in enumerate(en)]
    (root / "ocr").mkdir()
    pq.write_table(rows_to_table(ocr), root / "ocr" / "part-00000.parquet")
    return {"text_pair": len(rows), "ocr": len(ocr)}


def _sts_from_xnli(path: Path, eval_data: Path) -> None:
    """A graded STS file (TSV with header) from real XNLI rows: entailment 1, neutral 0.5, contradiction 0."""
    prem, hyp, label = D.load_xnli(eval_data / "xnli_dev" / "dev-vi.tsv")
    lines = ["s1\ts2\tscore"] + [f"{p}\t{h}\t{D.XNLI_GRADE[lab]}" for p, h, lab in list(zip(prem, hyp, label))[:60]]
    path.write_text("\n".join(lines) + "\n")


def test_bm25_finds_xquad_paragraphs(eval_data):
    """DESIGN's lexical bar: BM25 question → paragraph on Vietnamese XQuAD (all 1190 questions)."""
    sq = D.load_squad(eval_data / "xquad" / "xquad.vi.json")
    assert (len(sq.paragraphs), len(sq.questions)) == (240, 1190)
    ranked, _ = top_k_of_scores(BM25(sq.paragraphs).scores(sq.questions), 10)
    m = retrieval_metrics(ranked, sq.paragraph_of)
    assert m["R@10"] > 0.9 and m["R@1"] > 0.8, m


def test_real_file_quirks(eval_data):
    labels = D.load_binary_labels(eval_data / "vnpara" / "Labels.txt")
    assert len(labels) == 3083 and labels[61] == 1  # line 62 reads "1,"
    sides = D.load_aligned([str(eval_data / "ntrex128" / f) for f in
                            ("newstest2019-ref.vie.txt", "newstest2019-src.eng.txt", "newstest2019-ref.zho-CN.txt")])
    assert [len(s) for s in sides] == [1997] * 3
    vi, zh = D.load_squad(eval_data / "xquad" / "xquad.vi.json"), D.load_squad(eval_data / "xquad" / "xquad.zh.json")
    assert vi.question_ids == zh.question_ids  # what cross-lingual retrieval relies on


def test_bad_specs_and_files_name_the_problem(tmp_path, eval_data):
    with pytest.raises(ValueError, match="unknown kind 'nope'"):
        parse_suite("nope:x")
    with pytest.raises(ValueError, match="SQuAD file not found: .*missing.json"):
        parse_suite(f"retrieval:squad:{tmp_path / 'missing.json'}")
    with pytest.raises(ValueError, match="expected pairs:S1,S2,LABELS"):
        parse_suite(f"pairs:{eval_data / 'vnpara' / 'Labels.txt'}")
    bad = tmp_path / "labels.txt"
    bad.write_text("0\n1\nyes\n")
    with pytest.raises(ValueError, match=r"labels.txt:3: expected a 0/1 label, got 'yes'"):
        D.load_binary_labels(bad)
    short = tmp_path / "short.txt"
    short.write_text("one line\n")
    with pytest.raises(ValueError, match="differ in length"):
        D.load_aligned([str(short), str(eval_data / "ntrex128" / "newstest2019-src.eng.txt")])
    sts = tmp_path / "sts.tsv"
    sts.write_text("a\tb\t1\nc\td\thigh\n")
    with pytest.raises(ValueError, match=r"sts.tsv:2: score 'high' is not a number"):
        D.load_sts(sts)


def test_evaluate_cli_runs_every_suite(tiny_model_dir, eval_data, tmp_path):
    x, n, v, xn = (eval_data / d for d in ("xquad", "ntrex128", "vnpara", "xnli_dev"))
    sts = tmp_path / "sts.tsv"
    _sts_from_xnli(sts, eval_data)
    rows = _canonical(tmp_path / "canonical", eval_data)
    specs = [
        f"retrieval:squad:{x / 'xquad.vi.json'}",
        f"retrieval:squad:{x / 'xquad.vi.json'},{x / 'xquad.zh.json'}",
        f"bitext:{n / 'newstest2019-ref.vie.txt'},{n / 'newstest2019-src.eng.txt'},{n / 'newstest2019-ref.zho-CN.txt'}",
        f"pairs:{v / 'Sentences1.txt'},{v / 'Sentences2.txt'},{v / 'Labels.txt'}",
        f"sts:{sts}",
        f"xnli:{xn / 'dev-vi.tsv'}",
        f"xnli:{xn / 'dev-vi.tsv'},{xn / 'dev-en.tsv'}",
        f"canonical:{tmp_path / 'canonical'}",
    ]
    out = tmp_path / "eval" / "report.json"
    extra = tmp_path / "photo.png"
    Image.new("RGB", (90, 60), (30, 120, 200)).save(extra)
    argv = ["--model", str(tiny_model_dir), "--out", str(out), "--limit", str(LIMIT), "--examples", "2", "--no-progress",
            "--image", str(extra), "--set", "model.max_length=128"]
    for s in specs:
        argv += ["--suite", s]
    assert evaluate.main(argv) == 0

    report = json.loads(out.read_text())
    assert report["overrides"] == {"max_length": 128}
    by_name = {(r["kind"], r["name"]): r for r in report["results"]}
    assert {k for k, _ in by_name} == {"retrieval", "bitext", "pairs", "sts", "xnli", "canonical"}
    for r in report["results"]:
        assert r["n_queries"] > 0 and r["corpus_size"] > 0
        for system, metrics in r["metrics"].items():
            for name, value in metrics.items():
                if name in ("threshold", "spearman"):
                    assert np.isfinite(value)
                else:
                    assert 0.0 <= value <= 1.0, (r["name"], system, name, value)

    mono = by_name[("retrieval", "xquad.vi")]
    assert (mono["n_queries"], mono["corpus_size"]) == (LIMIT, 240)  # the corpus is never subsampled
    assert set(mono["metrics"]["model"]) == {"R@1", "R@5", "R@10", "MRR@10", "nDCG@10"}
    assert mono["metrics"]["bm25"]["R@10"] > 0.5
    cross = by_name[("retrieval", "xquad.zh → xquad.vi")]
    assert cross["n_queries"] == LIMIT and "bm25" in cross["metrics"]
    bitext = [r for r in report["results"] if r["kind"] == "bitext"]
    assert len(bitext) == 3 and all(r["n_queries"] == LIMIT for r in bitext)  # vi-en, vi-zh, en-zh
    assert by_name[("pairs", "vnpara")]["metrics"]["bm25"]["AP"] > 0.5
    assert ("xnli", "dev-vi × dev-en") in by_name and "bm25" not in by_name[("xnli", "dev-vi × dev-en")]["metrics"]

    # canonical: per task over all rows and per language; duplicate paragraphs are one document
    tp_all = by_name[("canonical", "text_pair/all")]
    assert tp_all["n_queries"] == rows["text_pair"]
    assert tp_all["corpus_size"] < rows["text_pair"]  # XQuAD questions share paragraphs
    assert {("canonical", "text_pair/vi"), ("canonical", "text_pair/en")} <= set(by_name)
    assert by_name[("canonical", "text_pair/vi")]["n_queries"] == 12
    assert "bm25" in tp_all["metrics"]
    ocr = by_name[("canonical", "ocr/en")]  # one language: no separate "all" row
    assert ocr["n_queries"] == rows["ocr"] and "bm25" not in ocr["metrics"]

    md = out.with_suffix(".md").read_text()
    assert "| xquad.vi | bm25 | 24 | 240 |" in md
    for kind in ("retrieval", "bitext", "pairs", "sts", "xnli", "canonical"):
        assert f"## {kind}" in md
    examples = out.with_suffix(".examples.md").read_text()
    assert "### xquad.vi" in examples and "**Q2.**" in examples and "canonical text_pair/all" in examples
    pngs = sorted(out.parent.glob("report.attention-*.png"))
    assert [p.name.split("-", 2)[-1] for p in pngs] == ["ocr-query.png", "photo.png"]
    assert "(report.attention-2-photo.png)" in examples
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_inference_overrides(tiny_model_dir):
    """A training YAML may be passed as is: only settings that change how the model runs apply."""
    cfg = load_config(overrides=["model.max_length=32", "model.pooling.kind=mean", "train.max_steps=3"])
    assert inference_overrides(cfg) == {"max_length": 32}
    assert inference_overrides(load_config()) == {}
    eff = effective_model_config(tiny_model_dir, {"max_length": 32})
    saved = effective_model_config(tiny_model_dir, {})
    assert eff.max_length == 32 and eff.pooling == saved.pooling and eff.projection == saved.projection
    assert load_for_inference(tiny_model_dir, {"max_length": 32}).cfg.max_length == 32
    with pytest.raises(ValueError, match="image_min_pixels"):
        effective_model_config(tiny_model_dir, {"image_min_pixels": 10**9})
