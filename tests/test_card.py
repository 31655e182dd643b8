"""The model card: written at export from the run, validated, and given an evaluation table by
`pipelines.evaluate --card` (BM25 beside the model); errors name the file, key or section."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from vipoly.model.card import (CARD_FILE, DEMO_TAG, EVAL_END, EVAL_START, FRONT_KEYS, NO_EVALUATION, SECTIONS,
                               check_card, parse_card, set_evaluation, write_card)
from vipoly.tasks import TASKS

SEEN = {"text_pair": 40, "instr": 10, "ocr": 20, "vqa_single": 0, "vqa_multi": 10}
ROWS_BY_LANG = {"text_pair": {"vi": 6, "en": 3, "zh": 1}, "instr": {"vi": 1, "en": 1}, "ocr": {"vi": 1}}


@pytest.fixture
def run(tiny_model_dir, tmp_path):
    """A training run directory as pipelines.train leaves it: config.yaml, plan.json, metrics.jsonl, model/."""
    from vipoly.config import load_config

    run = tmp_path / "run"
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"rows_by_lang": ROWS_BY_LANG}))
    cfg = load_config(overrides=[f"run.dir={run}", f"data.root={data}", "train.max_steps=2", "train.num_workers=2",
                                 "data.mix={text_pair: 1, instr: 3, ocr: 1}"])
    run.mkdir()
    (run / "plan.json").write_text("{}\n")
    cfg.save(run / "config.yaml")
    rows = [{"step": s, "loss": 2.0 / s, "bad_steps_total": 0, **{f"samples_seen/{t}": SEEN[t] * s // 2 for t in TASKS}}
            for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(tiny_model_dir, run / "model")
    return run, cfg


def test_export_writes_card_and_st_default_from_the_run(run, tiny_model):
    import torch

    from vipoly.st import read_st_config
    from vipoly.train.engine import DDPEngine

    run_dir, cfg = run
    out = run_dir / "model"
    shutil.rmtree(out)
    DDPEngine(tiny_model, cfg, total_steps=2, device=torch.device("cpu")).export(out, rank=0)
    front = check_card(out / CARD_FILE)
    assert front["pipeline_tag"] == "feature-extraction" and front["language"] == ["vi", "en", "zh"]
    assert front["library_name"] == "sentence-transformers" and front["license"] == "apache-2.0"
    assert front["base_model"] == "vipoly-tiny" and DEMO_TAG in front["tags"] and "matryoshka" in front["tags"]
    text = (out / CARD_FILE).read_text()
    assert "**Pipeline demonstration.**" in text  # the tiny backbone: a demo model says so
    assert read_st_config(out)["default_prompt_name"] == "instr"  # the mix's heaviest task
    assert "default prompt: `instr`" in text
    # training summary read from the run: samples per task, ≈ per language from the manifest, steps, time
    assert "| ocr | 20 | 20 | 0 | 0 |" in text
    assert "| text_pair | 40 | 24 | 12 | 4 |" in text
    assert "| **all** | **80** |" in text
    assert "Steps run: 2; loss 2.0000 → 1.0000" in text
    assert re.search(r"Wall time: \d+ s", text)
    assert "Hardware: 1 CPU worker(s)" in text
    assert "| data.mix | text_pair 0.20, instr 0.60, ocr 0.20 |" in text
    assert NO_EVALUATION in text


def test_card_without_a_run_and_not_a_demo(tiny_model_dir, tmp_path):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    meta = json.loads((model / "vipoly.json").read_text())
    meta["model"]["backbone"] = "Qwen/Qwen2-VL-2B-Instruct"
    (model / "vipoly.json").write_text(json.dumps(meta))
    write_card(model, license="mit")
    front, body = parse_card(model / CARD_FILE)
    assert front["base_model"] == "Qwen/Qwen2-VL-2B-Instruct" and front["license"] == "mit"
    assert DEMO_TAG not in front["tags"] and "demonstration" not in body
    assert "no training record" in body
    assert [h[3:] for h in body.splitlines() if h.startswith("## ")] == list(SECTIONS)


def test_evaluate_card_adds_then_refreshes_the_table(run, eval_data):
    from pipelines import evaluate

    run_dir, _ = run
    model = run_dir / "model"
    write_card(model, run_dir=run_dir)
    xquad = eval_data / "xquad" / "xquad.vi.json"
    args = ["--model", str(model), "--suite", f"retrieval:squad:{xquad}", "--task", "instr", "--no-progress",
            "--out", str(run_dir / "eval.json"), "--card", str(model)]
    assert evaluate.main(args + ["--limit", "20"]) == 0
    text = (model / CARD_FILE).read_text()
    section = text[text.index(EVAL_START):text.index(EVAL_END)]
    assert re.search(r"\| xquad\.vi \| model \| 20 \| 240 \|", section)
    assert re.search(r"\| xquad\.vi \| bm25 \| 20 \| 240 \|", section)  # the lexical bar beside ours
    assert "task instr, limit 20" in section and NO_EVALUATION not in text
    assert evaluate.main(args + ["--limit", "10"]) == 0  # refresh: the section is replaced, not appended
    text = (model / CARD_FILE).read_text()
    assert text.count(EVAL_START) == 1 and "| xquad.vi | bm25 | 10 | 240 |" in text and "| 20 | 240 |" not in text
    check_card(model / CARD_FILE)
    # rewriting the card (e.g. python -m vipoly.st add DIR --card) keeps the evaluation section
    write_card(model, run_dir=run_dir)
    assert "| xquad.vi | bm25 | 10 | 240 |" in (model / CARD_FILE).read_text()


def test_card_errors_name_file_key_and_section(run, tmp_path):
    from pipelines import evaluate

    run_dir, _ = run
    model = run_dir / "model"
    card = model / CARD_FILE
    write_card(model, run_dir=run_dir)
    front, body = parse_card(card)
    for key in FRONT_KEYS:
        card.write_text("---\n" + yaml.safe_dump({k: v for k, v in front.items() if k != key}) + "---\n" + body)
        with pytest.raises(ValueError, match=re.escape(f"{card}: front matter lacks key(s) ['{key}']")):
            check_card(card)
    card.write_text("---\n" + yaml.safe_dump(front) + "---\n" + body.replace("## Limitations", "## Caveats"))
    with pytest.raises(ValueError, match=re.escape(f"{card}: missing section(s) ['## Limitations']")):
        check_card(card)
    card.write_text("# Just a README\n")
    with pytest.raises(ValueError, match=re.escape(f"{card}: no YAML front matter")):
        check_card(card)
    with pytest.raises(SystemExit, match=re.escape(f"--card: {card}: no YAML front matter")):
        evaluate.main(["--model", str(model), "--suite", "bitext:a,b", "--out", str(tmp_path / "e.json"),
                       "--card", str(model)])  # refused before any model work
    with pytest.raises(SystemExit, match=r"--card: .*not a saved PolyEmbedder \(no vipoly.json\)"):
        evaluate.main(["--model", str(model), "--suite", "bitext:a,b", "--out", str(tmp_path / "e.json"),
                       "--card", str(tmp_path)])
    with pytest.raises(ValueError, match=r"not a saved PolyEmbedder \(no vipoly.json\)"):
        write_card(tmp_path)
    write_card(model, run_dir=run_dir)
    text = card.read_text()
    card.write_text(text.replace(EVAL_START, ""))
    with pytest.raises(ValueError, match="markers"):
        set_evaluation(model, "x")


def test_st_add_card_writes_the_run_summary(run):
    from vipoly.st.__main__ import main

    run_dir, _ = run
    model = run_dir / "model"
    assert main(["add", str(model), "--card"]) == 0  # the folder above is the run
    text = (model / CARD_FILE).read_text()
    assert "| text_pair | 40 |" in text and "Hardware: 2 worker(s), CPU" in text


def test_card_usage_examples_run(run, tmp_path, monkeypatch, capsys):
    run_dir, _ = run
    model = run_dir / "model"
    write_card(model, run_dir=run_dir)
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "bill.png")
    monkeypatch.chdir(tmp_path)  # the examples name bill.png
    blocks = re.findall(r"```python\n(.*?)```", (model / CARD_FILE).read_text(), flags=re.S)
    assert len(blocks) == 2
    for code in blocks:
        scope: dict = {}
        exec(compile(code.replace("MODEL_DIR", str(model)), str(model / CARD_FILE), "exec"), scope)
        assert scope["pair"].shape[0] == 1 and scope["small"].shape == (1, 8)


def test_evaluation_on_a_folder_without_a_card_writes_the_whole_card(run):
    run_dir, _ = run
    model = run_dir / "model"
    assert not (model / CARD_FILE).exists()
    set_evaluation(model, "| suite | system |\n|---|---|\n| x | bm25 |")
    text = (model / CARD_FILE).read_text()
    check_card(model / CARD_FILE)
    assert "| x | bm25 |" in text and "| text_pair | 40 |" in text  # the run above the folder is read too


def test_st_add_refuses_a_run_without_config(run, tmp_path):
    from vipoly.st.__main__ import main

    run_dir, _ = run
    with pytest.raises(SystemExit, match=r"--run .*no config.yaml"):
        main(["add", str(run_dir / "model"), "--run", str(tmp_path / "nowhere")])
