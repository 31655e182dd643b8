"""tune.sensitivity on functions whose importances are known (no Ray, no training)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tune import importance as imp
from tune import sensitivity
from tune.space import DEFAULT_SPACE, Range, sobol_design

NAMES = ["stw.alpha.instr", "loss.temperature", "stw.beta_balance"]
SPACE = {n: DEFAULT_SPACE[n] for n in NAMES}


def _unit(space, X):
    """Each column mapped back to [0, 1] within its range (log columns geometrically)."""
    out = np.empty_like(X)
    for k, r in enumerate(space.values()):
        lo, hi, x = (np.log(r.low), np.log(r.high), np.log(X[:, k])) if r.log else (r.low, r.high, X[:, k])
        out[:, k] = (x - lo) / (hi - lo)
    return out


def known(X):
    """y = 1.0·u0 + 0.3·u1 (+ 0·u2) on unit-scaled parameters: α_instr dominates, β_balance is inert.
    Main-effect variance shares: 1/1.09 ≈ 0.92, 0.09/1.09 ≈ 0.08, 0."""
    u = _unit(SPACE, X)
    return 1.0 * u[:, 0] + 0.3 * u[:, 1]


def random_trials(n=48, seed=0):
    rng = np.random.default_rng(seed)
    X = np.column_stack([r.from_unit(rng.random(n)) for r in SPACE.values()])
    return X, known(X) + rng.normal(0, 0.01, n)


def write_trials(root: Path, X, y, designs=None, status="complete"):
    rows = []
    for k, (x, v) in enumerate(zip(X, y)):
        rows.append({"trial_id": f"t{k:03d}", "experiment": "search", "status": status, "step": 10,
                     "params": dict(zip(NAMES, map(float, x))), "design": designs[k] if designs else None,
                     "metrics": {"objective": float(v), "heldout/mean": float(v), "heldout/worst": float(v) - 0.1,
                                 "heldout/ocr/MRR@10": float(v), "heldout/instr/MRR@10": float(_unit(SPACE, x[None])[0, 1])},
                     "error": None})
    root.mkdir(parents=True, exist_ok=True)
    (root / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_fanova_and_ped_anova_put_the_dominant_parameter_first():
    X, y = random_trials()
    fa = imp.fanova(X, y, SPACE)
    assert list(fa)[0] == "stw.alpha.instr"
    assert fa["stw.alpha.instr"] > 0.7 and fa["stw.beta_balance"] < 0.05
    assert sum(fa.values()) == pytest.approx(1.0)
    pa = imp.ped_anova(X, y, SPACE)
    assert list(pa)[0] == "stw.alpha.instr" and pa["stw.beta_balance"] < pa["stw.alpha.instr"]


def test_sobol_indices_match_the_analytic_values():
    space = {f"x{i}": Range(0.0, 1.0) for i in range(3)}
    a = np.array([1.0, 0.5, 0.0])
    pts = sobol_design(space, 512, seed=1)
    X = np.array([[p[f"x{i}"] for i in range(3)] for p in pts])
    y = X @ a  # linear: S_i = S_Ti = a_i² / Σ a²
    s = imp.sobol_indices([p["_design"] for p in pts], y, list(space), 512)
    expected = a ** 2 / (a ** 2).sum()
    for i in range(3):
        assert s["first"][f"x{i}"] == pytest.approx(expected[i], abs=0.05)
        assert s["total"][f"x{i}"] == pytest.approx(expected[i], abs=0.05)
    assert list(s["total"])[0] == "x0"
    with pytest.raises(ValueError, match="missing"):
        imp.sobol_indices([p["_design"] for p in pts[1:]], y[1:], list(space), 512)


def test_partial_dependence_follows_the_trend():
    x = np.linspace(0, 1, 40)
    cx, m, _ = imp.partial_dependence(x, 2 * x, bins=4)
    assert len(cx) == 4 and np.all(np.diff(m) > 0)


def test_report_on_a_known_function(tmp_path):
    X, y = random_trials()
    write_trials(tmp_path, X, y)
    assert sensitivity.main(["--results", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    summary = report.split("## Summary", 1)[1].split("##", 1)[0]
    first = summary.strip().splitlines()[0]
    method = "fANOVA" if imp.fanova_available() else "PED-ANOVA"  # fANOVA needs scikit-learn
    assert first.startswith("- α_instr explains") and method in first and "higher values scored higher" in first
    if method == "fANOVA":
        assert "PED-ANOVA agrees" in summary
        assert "β_balance" in summary and "hardly matter" in summary
    # per-task: the instr column was built from the temperature alone
    assert "For instr, T matters most" in summary
    assert "## Top trials" in report
    for png in ("importance.png", "importance_per_task.png", "metric_vs_params.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000


def test_report_uses_sobol_on_a_saltelli_design(tmp_path):
    from tune.config import load_harness, save_harness

    pts = sobol_design(SPACE, 16, seed=0)
    X = np.array([[p[n] for n in NAMES] for p in pts])
    write_trials(tmp_path, X, known(X), designs=[p["_design"] for p in pts])
    harness, cfg = load_harness(None, ["sweep.searcher=sobol", "sweep.sobol_n=16",
                                       "sweep.params={stw.alpha.instr: null, loss.temperature: null, stw.beta_balance: null}"])
    save_harness(harness, cfg, tmp_path / "sweep.yaml")
    sensitivity.write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "Sobol total" in report and "Sobol first-order" in report
    row = next(line for line in report.splitlines() if line.startswith("| α_instr"))
    assert float(row.split("|")[-4]) > 0.8  # Sobol total of the dominant parameter


def test_too_few_or_no_trials(tmp_path):
    X, y = random_trials(n=3)
    write_trials(tmp_path, X, y)
    sensitivity.write_report(tmp_path)
    assert "Too few complete trials (3)" in (tmp_path / "report.md").read_text()
    assert sensitivity.main(["--results", str(tmp_path / "nowhere")]) == 2


def test_report_without_scikit_learn_falls_back_to_ped_anova(tmp_path, monkeypatch):
    monkeypatch.setattr(imp, "fanova_available", lambda: False)
    X, y = random_trials(n=24)
    write_trials(tmp_path, X, y)
    sensitivity.write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "fANOVA skipped: it needs scikit-learn" in report
    assert "- α_instr explains" in report and "(PED-ANOVA, 24 trials)" in report


def test_one_at_a_time_curves_in_the_report(tmp_path):
    X, _ = random_trials(n=8)
    y = known(X)  # noise-free, so the inert parameter's curve is flat through the centre too
    write_trials(tmp_path, X, y)
    rows = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    center = rows[int(np.argmax(y))]
    for k, name in enumerate(NAMES):
        r = SPACE[name]
        for v in r.grid(3):
            params = {**center["params"], name: v}
            xv = np.array([[params[n] for n in NAMES]])
            rows.append({**center, "trial_id": f"oat-{name}-{v:.3g}", "experiment": "oat", "params": params,
                         "design": ["OAT", k, name, center["trial_id"]], "metrics": {"objective": float(known(xv)[0])}})
    (tmp_path / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = sensitivity.write_report(tmp_path).read_text()
    line = next(s for s in report.splitlines() if s.startswith("- One-at-a-time"))
    assert line.index("α_instr by") < line.index("T by") < line.index("β_balance by")  # largest spread first
    assert "β_balance by 0.000 (no effect)" in line
    assert "squares: one-at-a-time curves" in report
