"""Which parameters matter: importance estimators over a table of trials (no Ray here).

All functions take X (trials × parameters, in the order of `space`) and a target y (higher is
better) and return {parameter: importance}, sorted, largest first.

- fANOVA (Hutter et al. 2014, optuna's `FanovaImportanceEvaluator`): a random forest fitted to
  y(x), its variance split into the main effect of each parameter; normalised over the
  parameters, importance_i ≈ Var_{x_i}(E[y | x_i]) / Σ_j Var_{x_j}(E[y | x_j]) — "the share of
  the explained variance due to x_i". Needs scikit-learn (optuna builds its forest with it).
- PED-ANOVA (Watanabe et al. 2023, optuna's `PedAnovaImportanceEvaluator`): how differently
  x_i is distributed among the top-`quantile` trials than among all of them (a Pearson
  divergence of Parzen estimates); it says which parameters one must get right to reach the top,
  and works from few trials.
- Sobol indices (Saltelli 2010 first order, Jansen total order; `scipy.stats.sobol_indices`)
  when the trials are a Saltelli design (`tune.space.sobol_design`): S_i = V_i / V(y) with
  V_i = Var(E[y | x_i]) the first-order share, S_Ti the total share including interactions.

`partial_dependence` gives the curve E[y | x_i] binned over the trials (a cheap stand-in for
one-at-a-time curves, which need extra training runs: `python -m tune.sensitivity --oat N`).
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

from tune.space import Range


def _study(X: np.ndarray, y: np.ndarray, space: Mapping[str, Range]):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = list(space)
    dists = {n: optuna.distributions.FloatDistribution(r.low, r.high, log=r.log) for n, r in space.items()}
    study = optuna.create_study(direction="maximize")
    study.add_trials([optuna.trial.create_trial(params={n: float(np.clip(x[k], space[n].low, space[n].high))
                                                        for k, n in enumerate(names)},
                                                distributions=dists, value=float(v)) for x, v in zip(X, y)])
    return study


def _check(X: np.ndarray, y: np.ndarray, space: Mapping[str, Range], minimum: int) -> None:
    if X.shape != (len(y), len(space)):
        raise ValueError(f"X has shape {X.shape}, expected ({len(y)}, {len(space)})")
    if len(y) < minimum:
        raise ValueError(f"needs ≥ {minimum} trials, got {len(y)}")


def fanova_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sklearn") is not None


def fanova(X: np.ndarray, y: np.ndarray, space: Mapping[str, Range], seed: int = 0) -> dict[str, float]:
    """Normalised fANOVA main-effect importances (sum to 1)."""
    import optuna

    _check(X, y, space, 3)
    if not fanova_available():
        raise ImportError("fANOVA needs scikit-learn (pip install scikit-learn)")
    if np.ptp(y) == 0:
        return {n: 0.0 for n in space}
    return dict(optuna.importance.get_param_importances(
        _study(X, y, space), evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)))


def ped_anova(X: np.ndarray, y: np.ndarray, space: Mapping[str, Range], quantile: float = 0.25) -> dict[str, float]:
    """Normalised PED-ANOVA importances of reaching the top `quantile` of y (sum to 1).
    The default quantile is larger than optuna's 0.1 because sweeps here have tens of trials, not
    hundreds, and PED-ANOVA wants about 5 trials in the top set."""
    import optuna

    _check(X, y, space, 4)
    if np.ptp(y) == 0:
        return {n: 0.0 for n in space}
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile, evaluate_on_local=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "few trials above the quantile": the report says how many were used
        # PED-ANOVA minimises its target: negate y, which we maximise.
        return dict(optuna.importance.get_param_importances(_study(X, y, space), evaluator=evaluator,
                                                            target=lambda t: -t.value))


def sobol_indices(designs: Sequence, y: np.ndarray, names: Sequence[str], n: int) -> dict[str, dict[str, float]]:
    """{"first": {name: S_i}, "total": {name: S_Ti}} from the evaluations of a Saltelli design.

    designs[k] = [matrix, i, row] as `tune.space.sobol_design` tags point k; every one of the
    n(d + 2) points must be present (a missing or failed trial leaves the estimate undefined)."""
    from scipy.stats import sobol_indices as scipy_sobol

    d = len(names)
    f_a, f_b, f_ab = np.full(n, np.nan), np.full(n, np.nan), np.full((d, n), np.nan)
    for (matrix, i, row), v in zip(designs, y):
        if matrix == "A":
            f_a[row] = v
        elif matrix == "B":
            f_b[row] = v
        elif matrix == "AB":
            f_ab[i, row] = v
    missing = int(np.isnan(f_a).sum() + np.isnan(f_b).sum() + np.isnan(f_ab).sum())
    if missing:
        raise ValueError(f"Sobol indices need all {n * (d + 2)} design points; {missing} are missing or failed")
    if np.var(np.concatenate([f_a, f_b])) == 0:
        zero = {nm: 0.0 for nm in names}
        return {"first": zero, "total": dict(zero)}
    res = scipy_sobol(func={"f_A": f_a[None], "f_B": f_b[None], "f_AB": f_ab[:, None, :]}, n=n)
    first, total = (np.asarray(v).reshape(-1, d)[0] for v in (res.first_order, res.total_order))
    order = np.argsort(-total)
    return {"first": {names[k]: float(first[k]) for k in order}, "total": {names[k]: float(total[k]) for k in order}}


def partial_dependence(x: np.ndarray, y: np.ndarray, bins: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin centres, mean y, std y) of y over quantile bins of x: the curve E[y | x] seen in the trials."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    bins = max(1, min(bins, len(np.unique(x))))
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2) if len(edges) > 1 else np.zeros(len(x), int)
    keep = [b for b in range(max(1, len(edges) - 1)) if np.any(which == b)]
    centre = np.array([x[which == b].mean() for b in keep])
    mean = np.array([y[which == b].mean() for b in keep])
    std = np.array([y[which == b].std() for b in keep])
    return centre, mean, std
