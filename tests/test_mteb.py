"""Two harnesses, one answer: MTEB's own evaluator (real mteb, through sentence-transformers) and
`pipelines.evaluate` give the same nDCG@10 for the same XQuAD-vi queries, corpus and relevance."""
from __future__ import annotations

import json

import pytest

import mteb  # noqa: F401  (make setup installs the [eval] extra: a missing one fails, it is not skipped)
import sentence_transformers  # noqa: F401

LIMIT = 100


def test_mteb_and_pipelines_evaluate_agree_on_xquad(tiny_model_dir, eval_data, tmp_path):
    from pipelines import evaluate, mteb_eval

    xquad = eval_data / "xquad" / "xquad.vi.json"
    ours = tmp_path / "ours.json"
    assert evaluate.main(["--model", str(tiny_model_dir), "--suite", f"retrieval:squad:{xquad}", "--task", "instr",
                          "--limit", str(LIMIT), "--out", str(ours), "--no-progress"]) == 0
    [row] = json.loads(ours.read_text())["results"]
    assert row["n_queries"] == LIMIT and row["corpus_size"] == 240
    out = tmp_path / "mteb"
    assert mteb_eval.main(["--model", str(tiny_model_dir), "--squad", str(xquad), "--limit", str(LIMIT),
                           "--prompt", "instr", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())["scores"]
    theirs = summary["vipoly-squad-xquad.vi/test"]["ndcg_at_10"]
    assert theirs == pytest.approx(row["metrics"]["model"]["nDCG@10"], abs=1e-3)
    # MTEB's own result file, with its other metrics: MRR@10 agrees too
    [result] = out.glob("results/*/*/vipoly-squad-xquad.vi.json")
    scores = json.loads(result.read_text())["scores"]["test"][0]
    assert scores["mrr_at_10"] == pytest.approx(row["metrics"]["model"]["MRR@10"], abs=1e-3)
    assert scores["recall_at_10"] == pytest.approx(row["metrics"]["model"]["R@10"], abs=1e-3)
    assert "vipoly" in result.parent.parent.name  # results named after the model


def test_squad_task_holds_the_queries_pipelines_evaluate_uses(eval_data):
    from vipoly.eval import data as D
    from vipoly.eval.mteb import squad_task
    from vipoly.eval.suites import sample

    path = eval_data / "xquad" / "xquad.vi.json"
    task = squad_task(path, limit=LIMIT, seed=3)
    task.load_data()
    split = task.dataset["default"]["test"]
    squad = D.load_squad(path)
    sel = sample(len(squad.questions), LIMIT, 3)
    assert split["queries"]["text"] == [squad.questions[i] for i in sel]
    assert split["corpus"]["text"] == squad.paragraphs
    assert all(list(split["relevant_docs"][f"q{i}"]) == [f"d{squad.paragraph_of[i]}"] for i in sel)
    assert task.metadata.eval_langs == ["vie-Latn"] and task.metadata.main_score == "ndcg_at_10"
    with pytest.raises(ValueError, match="cannot tell the language"):
        squad_task(eval_data / "xquad" / "LICENSE_CC-BY-SA-4.0.txt")


def test_mteb_eval_refuses_bad_input(tmp_path):
    from pipelines import mteb_eval

    with pytest.raises(SystemExit, match="nothing to run"):
        mteb_eval.main(["--model", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"not a saved PolyEmbedder \(no vipoly.json\)"):
        mteb_eval.main(["--model", str(tmp_path), "--squad", "x.json"])
