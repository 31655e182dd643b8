"""tune.sweep and tune.ablate end to end: real Ray Tune trials, each a Ray Train run of the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tune import ablate, sweep
from vipoly.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from vipoly.data.synthetic import main as synthetic

    root = tmp_path_factory.mktemp("tune-data")
    synthetic(["--out", str(root / "train"), "--n", "100", "--seed", "0"])
    synthetic(["--out", str(root / "heldout"), "--n", "50", "--seed", "1"])
    return root / "train", root / "heldout"


def tiny(run_dir: Path, data, tiny_model_dir) -> list[str]:
    train, heldout = data
    return ["--set", f"run.dir={run_dir}", "--set", f"data.root={train}", "--set", f"heldout.data={heldout}",
            "--set", "synthetic=null", "--set", f"model.backbone={tiny_model_dir}", "--set", "train.max_steps=2",
            "--set", "train.batch_size=6", "--set", "train.log_every=1"]


def test_sweep_three_trials(tmp_path, ray_session, data, tiny_model_dir, capfd):
    run = tmp_path / "sweep"
    argv = ["--config", str(REPO / "configs" / "sweep-tiny.yaml"), *tiny(run, data, tiny_model_dir),
            "--set", "sweep.num_samples=3", "--set", "sweep.max_concurrent=3", "--set", "sweep.eval_every=1",
            "--set", "sweep.grace_period=1", "--set", "sweep.params={stw.alpha.instr: null, loss.temperature: null}"]
    assert sweep.main(argv) == 0
    rows = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["status"] in ("complete", "stopped") for r in rows)
    assert any(r["status"] == "complete" for r in rows)
    header = (run / "trials.csv").read_text().splitlines()[0].split(",")
    assert {"param:stw.alpha.instr", "param:loss.temperature", "objective"} <= set(header)
    assert {f"heldout/{t}/MRR@10" for t in TASKS} <= set(header)
    for r in rows:
        assert 1.1 <= r["params"]["stw.alpha.instr"] <= 1.3
        trial = run / "trials" / r["trial_id"]  # the training run is named after the Tune trial id
        rec = json.loads((trial / "trial.json").read_text())
        assert rec["evals"][0]["step"] == 1  # an intermediate held-out evaluation: what ASHA decides on
        assert (trial / "metrics.jsonl").is_file() and (trial / "model").is_dir()
        cfg = (trial / "config.yaml").read_text()
        assert f"instr: {r['params']['stw.alpha.instr']}" in cfg  # the trial trained with its own α_instr
        if r["status"] == "complete":
            assert r["step"] == 2 and 0 <= r["metrics"]["objective"] <= 1
    assert (run / "report.md").is_file()  # the sensitivity report (too few trials for importances)
    # Re-running restores the finished experiment instead of training again.
    capfd.readouterr()
    assert sweep.main(argv) == 0
    assert "resuming the search experiment" in capfd.readouterr().out
    assert len((run / "trials.jsonl").read_text().splitlines()) == 3


def test_ablation_two_factors(tmp_path, ray_session, data, tiny_model_dir):
    run = tmp_path / "ablate"
    argv = ["--config", str(REPO / "configs" / "ablate-tiny.yaml"), *tiny(run, data, tiny_model_dir),
            "--set", "ablate.factors={stw: [none, dynamic], pooling: [attention]}", "--set", "ablate.seeds=[0]"]
    assert ablate.main(argv) == 0
    report = (run / "report.md").read_text()
    assert "- stw dynamic vs none: " in report and "1 pair: no noise estimate" in report
    assert "| stw=none, pooling=attention | 1 |" in report and "| stw=dynamic, pooling=attention | 1 |" in report
    assert "per language" in report and (run / "plots" / "per_task.png").is_file()
    rows = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert sorted(r["params"]["stw.mode"] for r in rows) == ["dynamic", "none"]


def test_bad_configs_fail_before_training(tmp_path, data, capsys):
    base = ["--set", f"run.dir={tmp_path / 'run'}", "--set", "synthetic=null", "--set", f"data.root={data[0]}",
            "--set", f"heldout.data={data[1]}"]
    sweep_cfg, ablate_cfg = str(REPO / "configs" / "sweep-tiny.yaml"), str(REPO / "configs" / "ablate-tiny.yaml")
    assert sweep.main(["--config", sweep_cfg, *base, "--set", "sweep.params={stw.alpha.bogus: null}"]) == 2
    assert "stw.alpha.bogus" in capsys.readouterr().err
    assert sweep.main(["--config", sweep_cfg, *base, "--set", "stw.mode=static"]) == 2
    assert "dynamic" in capsys.readouterr().err  # α and β do nothing outside dynamic STW
    assert ablate.main(["--config", ablate_cfg, *base, "--set", "ablate.factors={stw: [none, sometimes]}"]) == 2
    assert "sometimes" in capsys.readouterr().err
    assert sweep.main(["--config", sweep_cfg, *base, "--set", f"heldout.data={tmp_path / 'none'}"]) == 2
    assert "heldout.data" in capsys.readouterr().err
    assert sweep.main(["--config", sweep_cfg, *base, "--set", f"heldout.data={data[0]}"]) == 2
    assert "not trained on" in capsys.readouterr().err
    assert not (tmp_path / "run" / "trials").exists()
