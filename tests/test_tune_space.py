"""tune/: search space, harness configs, objective folding, ablation verdicts (no Ray, no training)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tune.ablate import cells, verdicts
from tune.config import load_harness
from tune.objective import flatten
from tune.space import DEFAULT_SPACE, Range, apply_params, grid_points, oat_points, resolve_space, sobol_design
from vipoly.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_default_space_holds_spec_ranges():
    assert DEFAULT_SPACE["stw.alpha.text_pair"] == Range(0.25, 0.35)
    assert DEFAULT_SPACE["stw.alpha.instr"] == Range(1.1, 1.3)
    for t in ("ocr", "vqa_single", "vqa_multi"):
        assert DEFAULT_SPACE[f"stw.alpha.{t}"] == Range(0.9, 1.2)
    assert DEFAULT_SPACE["stw.beta_foundation"] == Range(1.0, 1.2)
    assert DEFAULT_SPACE["stw.beta_balance"] == Range(0.8, 1.0)
    t = DEFAULT_SPACE["loss.temperature"]
    assert t.low <= 0.07 and t.high >= 0.2 and t.log  # covers the default and the reference run
    defaults = Config().to_dict()
    for name, r in DEFAULT_SPACE.items():  # every reference value lies inside its range
        node = defaults
        for part in name.split("."):
            node = node[part]
        assert r.low <= node <= r.high, name


def test_resolve_space_subsets_patterns_and_errors():
    space = resolve_space({"stw.alpha.*": None, "loss.temperature": [0.1, 0.2], "train.optimizer.lr": {"low": 1e-5, "high": 1e-3, "log": True}})
    assert [n for n in space if n.startswith("stw.alpha.")] == sorted(f"stw.alpha.{t}" for t in
                                                                      ("text_pair", "instr", "ocr", "vqa_single", "vqa_multi"))
    assert space["loss.temperature"] == Range(0.1, 0.2, log=True)  # keeps the known parameter's log scale
    assert space["train.optimizer.lr"].log
    assert resolve_space({}) == DEFAULT_SPACE
    with pytest.raises(ValueError, match="stw.alpha.nope"):
        resolve_space({"stw.alpha.nope": [0, 1]})
    with pytest.raises(ValueError, match="no default range"):
        resolve_space({"train.optimizer.lr": None})
    with pytest.raises(ValueError, match="loss.temperature"):
        resolve_space({"loss.temperature": [0.3, 0.1]})
    with pytest.raises(ValueError, match="not numeric"):
        resolve_space({"stw.mode": [0, 1]})
    with pytest.raises(ValueError, match="matches no known"):
        resolve_space({"stw.gamma.*": None})


def test_apply_params_sets_single_tasks_and_validates():
    cfg = apply_params(Config(), {"stw.alpha.instr": 1.2, "loss.lambda_triplet.vqa_multi": 2.0, "stw.mode": "none",
                                  "model.pooling.kind": "mean"})
    assert cfg.stw.alpha == {**Config().stw.alpha, "instr": 1.2}
    assert cfg.loss.lambda_triplet["vqa_multi"] == 2.0 and cfg.stw.mode.value == "none"
    assert cfg.model.pooling.kind.value == "mean"
    with pytest.raises(ConfigError, match="stw.alpha2"):
        apply_params(Config(), {"stw.alpha2.instr": 1.0})
    with pytest.raises(ConfigError, match="temperature"):
        apply_params(Config(), {"loss.temperature": -1.0})


def test_designs():
    space = {"a": Range(0.0, 1.0), "b": Range(1.0, 100.0, log=True)}
    grid = grid_points(space, 3)
    assert len(grid) == 9 and sorted({round(p["b"], 9) for p in grid}) == pytest.approx([1.0, 10.0, 100.0])
    pts = sobol_design(space, 8, seed=0)
    assert len(pts) == 8 * (2 + 2)
    a_rows = [p for p in pts if p["_design"][0] == "A"]
    ab0 = [p for p in pts if p["_design"][:2] == ["AB", 0]]
    b_rows = [p for p in pts if p["_design"][0] == "B"]
    for j in range(8):  # AB_0 = A with column 0 from B
        assert ab0[j]["a"] == b_rows[j]["a"] and ab0[j]["b"] == a_rows[j]["b"]
    assert all(0 <= p["a"] <= 1 and 1 <= p["b"] <= 100 for p in pts)
    with pytest.raises(ValueError, match="power of 2"):
        sobol_design(space, 6)
    oat = oat_points(space, {"a": 0.5, "b": 10.0}, 4)
    assert len(oat) == 8 and all(p["b"] == 10.0 for p in oat if p["_design"][2] == "a")


def test_harness_splits_training_and_sweep_keys(tmp_path):
    harness, cfg = load_harness(REPO / "configs" / "sweep-tiny.yaml",
                                ["sweep.num_samples=3", "train.max_steps=4", "heldout.objective=worst"])
    assert harness.sweep.num_samples == 3 and harness.heldout.objective == "worst"
    assert cfg.train.max_steps == 4 and cfg.model.backbone == "tiny"  # from the base file
    assert cfg.stw.update_every == 3  # inline section over the base file
    with pytest.raises(ConfigError, match="sweep.searcher"):
        load_harness(REPO / "configs" / "sweep-tiny.yaml", ["sweep.searcher=bayes"])
    with pytest.raises(ConfigError, match="train.nope"):
        load_harness(REPO / "configs" / "sweep-tiny.yaml", ["train.nope=1"])
    with pytest.raises(ConfigError, match="scheduler: fifo"):
        load_harness(None, ["sweep.searcher=sobol", "sweep.scheduler=asha"])
    harness, _ = load_harness(None, ["sweep.searcher=grid"])
    assert harness.sweep.scheduler == "fifo"  # fixed designs default to fifo
    with pytest.raises(ConfigError, match="ablate"):
        load_harness(REPO / "configs" / "ablate-tiny.yaml", section="sweep")
    harness, cfg = load_harness(REPO / "configs" / "sweep-alpha-2b.yaml")
    assert harness.sweep.searcher == "sobol" and cfg.model.backbone == "Qwen/Qwen2-VL-2B-Instruct"
    assert len(resolve_space(harness.sweep.params)) == 7


def test_objective_mean_and_worst():
    groups = {"ocr/all": {"MRR@10": 0.5, "R@1": 0.4}, "ocr/vi": {"MRR@10": 0.6, "R@1": 0.5},
              "ocr/en": {"MRR@10": 0.3, "R@1": 0.2}, "instr/vi": {"MRR@10": 0.9, "R@1": 0.8}}
    m = flatten(groups, "MRR@10", "worst")
    assert m["heldout/ocr/MRR@10"] == 0.5 and m["heldout/instr/MRR@10"] == 0.9  # one language: that group
    assert m["heldout/mean"] == pytest.approx(0.7) and m["heldout/worst"] == 0.5 and m["objective"] == 0.5
    assert m["heldout/lang/vi"] == pytest.approx(0.75) and m["heldout/lang/en"] == 0.3
    assert flatten(groups, "MRR@10", "mean")["objective"] == pytest.approx(0.7)


def test_ablation_cells_and_verdicts():
    harness, cfg = load_harness(REPO / "configs" / "ablate-tiny.yaml",
                                ["ablate.factors={stw: [none, dynamic], pooling: [mean, attention]}", "ablate.seeds=[0, 1, 2]"],
                                section="ablate")
    pts = cells(harness)
    assert len(pts) == 2 * 2 * 3 and {p["stw.mode"] for p in pts} == {"none", "dynamic"}
    assert {p["train.seed"] for p in pts} == {0, 1, 2}

    def rows(diffs, noise):
        out = []
        for seed, (d, e) in enumerate(zip(diffs, noise)):
            base = 0.5 + 0.1 * seed  # seed effect: cancelled by pairing
            out.append({"design": ["cell", {"stw": "none"}, seed], "metrics": {"objective": base}})
            out.append({"design": ["cell", {"stw": "dynamic"}, seed], "metrics": {"objective": base + d + e}})
        return out

    clear = verdicts(rows([0.05] * 3, [0.002, -0.001, 0.0]), {"stw": ["none", "dynamic"]})[0]
    assert clear["delta"] == pytest.approx(0.05 + 0.001 / 3) and "better beyond noise" in clear["verdict"]
    noisy = verdicts(rows([0.01] * 3, [0.05, -0.06, 0.02]), {"stw": ["none", "dynamic"]})[0]
    assert "within noise" in noisy["verdict"] and noisy["pairs"] == 3
    one = verdicts(rows([0.05], [0.0]), {"stw": ["none", "dynamic"]})[0]
    assert "no noise estimate" in one["verdict"]
    assert np.isfinite(one["delta"])
