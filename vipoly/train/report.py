"""report.md with PNG plots from metrics.jsonl (refreshed at each checkpoint and at the end)."""
from __future__ import annotations

from pathlib import Path

from vipoly.tasks import TASKS
from vipoly.train.monitor import read_metrics
from vipoly.model.embedder import COMPONENTS

PLOTS = {
    "loss_per_task.png": ("Raw loss per task", "loss/{t}", TASKS),
    "task_weights.png": ("STW weight λ_t", "weight/{t}", TASKS),
    "task_shares.png": ("Share of the weighted loss", "share/{t}", TASKS),
    "grad_norms.png": ("Gradient norm by component", "grad_norm/{t}", COMPONENTS),
    "stability.png": ("Loss volatility (rolling std/mean) and pooling entropy", "{t}", ("volatility", "pooling_entropy")),
}


def _plot(rows: list[dict], title: str, pattern: str, names, out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    drawn = False
    for name in names:
        key = pattern.format(t=name)
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=name, lw=1.4)
            drawn = True
    if drawn:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=3)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    lines = [f"# Training report — {run_dir.name}", ""]
    if not rows:
        lines.append("No metrics logged yet.")
    else:
        first, last = rows[0], rows[-1]
        lines += [
            f"Steps {first['step']}–{last['step']} (phase now: {last['phase']}, epoch {last['epoch']}); "
            f"loss {first['loss']:.4f} → {last['loss']:.4f}; {last['samples_per_s']:.1f} samples/s at the end.",
            "",
            "| task | raw loss (first → last) | λ (last) | share (last) | samples seen |",
            "|---|---|---|---|---|",
        ]
        for t in TASKS:
            seen = last.get(f"samples_seen/{t}", 0)
            f0 = next((r[f"loss/{t}"] for r in rows if r.get(f"loss/{t}") is not None), None)
            f1 = next((r[f"loss/{t}"] for r in reversed(rows) if r.get(f"loss/{t}") is not None), None)
            lo = f"{f0:.3f} → {f1:.3f}" if f0 is not None else "—"
            lines.append(f"| {t} | {lo} | {last.get(f'weight/{t}', float('nan')):.3f} | "
                         f"{last.get(f'share/{t}', 0.0):.3f} | {seen} |")
        total_seen = sum(last.get(f"samples_seen/{t}", 0) for t in TASKS)
        lines += ["", f"Samples seen: {total_seen}; skipped (non-finite) steps: {last.get('bad_steps_total', 0)}.", ""]
        for fname, (title, pattern, names) in PLOTS.items():
            if _plot(rows, title, pattern, names, plots / fname):
                lines += [f"## {title}", "", f"![{title}](plots/{fname})", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
