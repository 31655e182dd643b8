"""PNG plots of the sweep and ablation reports (matplotlib, Agg backend; DejaVu Sans has α, β, λ)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from tune.space import Range


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(name: str) -> str:
    """A parameter's short printed name: stw.alpha.instr → α_instr, loss.lambda_score → λ_score."""
    parts = name.split(".")
    table = {"temperature": "T", "rank_margin": "m_rank", "beta_foundation": "β_foundation",
             "beta_balance": "β_balance", "lambda_score": "λ_score", "lambda_rank": "λ_rank"}
    if name.startswith("stw.alpha."):
        return f"α_{parts[-1]}"
    if name.startswith("loss.lambda_triplet."):
        return f"λ_trip[{parts[-1]}]"
    if name.startswith("loss.triplet_margin."):
        return f"m_trip[{parts[-1]}]"
    return table.get(parts[-1], name)


def importance_bars(importances: Mapping[str, Mapping[str, float]], title: str, out: Path) -> Path:
    """Grouped horizontal bars: one group per parameter, one bar per method."""
    plt = _plt()
    methods = list(importances)
    params = list(next(iter(importances.values())))
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(params) * max(1, len(methods)) ** 0.5))
    h = 0.8 / len(methods)
    ypos = np.arange(len(params))
    for k, m in enumerate(methods):
        ax.barh(ypos + k * h - 0.4 + h / 2, [importances[m].get(p, 0.0) for p in params], height=h, label=m)
    ax.set_yticks(ypos, [label(p) for p in params])
    ax.invert_yaxis()
    ax.set_xlabel("importance (share)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def scatter_grid(X: np.ndarray, y: np.ndarray, names: Sequence[str], ylabel: str, out: Path,
                 curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
                 best: int | None = None, extra: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 ranges: Mapping[str, "Range"] | None = None) -> Path:
    """The metric against each parameter: trials as dots, the binned mean E[y | x] as a line,
    the best trial circled, and one-at-a-time curves (`extra`) where trained; x axes span each
    parameter's searched range (log-scaled where it was searched on a log scale)."""
    plt = _plt()
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for k, name in enumerate(names):
        ax = axes[k // cols][k % cols]
        ax.scatter(X[:, k], y, s=16, alpha=0.7, label="trials")
        if curves and name in curves:
            cx, cm, cs = curves[name]
            ax.plot(cx, cm, color="C1", lw=1.6, label="binned mean")
            ax.fill_between(cx, cm - cs, cm + cs, color="C1", alpha=0.15)
        if extra and name in extra:
            ax.plot(*extra[name], "s--", color="C2", ms=4, lw=1.2, label="one-at-a-time")
        if best is not None:
            ax.scatter([X[best, k]], [y[best]], s=80, facecolors="none", edgecolors="red", label="best")
        if ranges and name in ranges:
            r = ranges[name]
            if r.log:
                ax.set_xscale("log")
            pad = 0.0 if r.log else 0.03 * (r.high - r.low)
            ax.set_xlim(r.low - pad, r.high + pad)
        ax.set_xlabel(label(name))
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    for k in range(len(names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def heatmap(values: Mapping[str, Mapping[str, float]], title: str, out: Path) -> Path:
    """Rows = targets (tasks), columns = parameters, cell = importance."""
    plt = _plt()
    targets = list(values)
    params = list(next(iter(values.values())))
    m = np.array([[values[t].get(p, np.nan) for p in params] for t in targets])
    fig, ax = plt.subplots(figsize=(1.1 * len(params) + 2, 0.45 * len(targets) + 1.6))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(params)), [label(p) for p in params], rotation=30, ha="right")
    ax.set_yticks(range(len(targets)), targets)
    for i in range(len(targets)):
        for j in range(len(params)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < 0.5 else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def grouped_bars(groups: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 ylabel: str, title: str, out: Path) -> Path:
    """Bars with ±std error bars: one group per x label, one bar per series (e.g. ablation cells)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(series)) ** 0.5), 3.6))
    w = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for k, (name, (mean, std)) in enumerate(series.items()):
        ax.bar(x + k * w - 0.4 + w / 2, mean, w, yerr=std, capsize=2, label=name)
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
