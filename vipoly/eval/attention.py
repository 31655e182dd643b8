"""Where does attention pooling look? The pooling weights a_i laid over an image's patch grid.

Qwen2-VL cuts an image into p×p patches on a (h, w) grid (`image_grid_thw` = (t, h, w)) and merges
each m×m block (m = merge_size = 2) into one <|image_pad|> token, in row-major order. So the pooling
weights at the <|image_pad|> positions of the input, in order, reshape to an (h/m, w/m) map; each
cell covers (m·p)² pixels of the image as the processor resized it (h·p × w·p pixels).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass
class PoolingMap:
    weights: np.ndarray
    """(h/m, w/m) pooling weight of each merged patch (the whole input's weights sum to 1)."""
    image: Any
    """The RGB image resized to the processor's size (w·p × h·p pixels)."""
    image_share: float
    """Σ of the weights on image tokens; the rest sits on prefix, text and end tokens."""


def pooling_map(model, image: Any, text: str | None = None, task: str | None = None) -> PoolingMap:
    """Run one (image[, text]) input through `model` and lay its pooling weights on the patch grid."""
    import torch

    from vipoly.model import decode_image

    pil = decode_image(image)
    builder = model.inputs
    row = builder.encode_one(text, pil, task)
    batch = {k: v.to(model.device) for k, v in builder.pad([row]).items()}
    with torch.no_grad():
        out = model(**batch)
    weights = out.pooling_weights.float().cpu().numpy()[0]
    if weights.ndim == 2:  # multi-head pooling: (heads, N) → the heads' mean
        weights = weights.mean(0)
    on_image = row["input_ids"] == builder.image_pad_id
    t, h, w = (int(x) for x in row["image_grid_thw"][0])
    m = builder.merge
    grid = weights[on_image].reshape(t, h // m, w // m).mean(0)
    patch = builder.processor.image_processor.patch_size
    resized = pil.resize((w * patch, h * patch))
    return PoolingMap(grid, resized, float(weights[on_image].sum()))


def save_heatmap(pm: PoolingMap, path: str | Path, title: str = "") -> Path:
    """The image, and the image under its pooling-weight map (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    width, height = pm.image.size
    axes[0].imshow(pm.image)
    axes[0].set_title("input (as resized)")
    axes[1].imshow(pm.image, extent=(0, width, height, 0))
    shown = axes[1].imshow(pm.weights, cmap="inferno", alpha=0.6, extent=(0, width, height, 0), interpolation="nearest")
    axes[1].set_title(f"pooling weight per merged patch\n(image tokens hold {pm.image_share:.0%} of it)")
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_heatmaps(model, images: Sequence[tuple[str, Any, str | None]], prefix: str | Path) -> list[Path]:
    """One PNG per (label, item, task); item is a suites.Item (its text rides along) or raw image."""
    paths = []
    for i, (label, item, task) in enumerate(images):
        image, text = (item.image, item.text) if hasattr(item, "image") else (item, None)
        pm = pooling_map(model, image, text, task)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
        paths.append(save_heatmap(pm, f"{prefix}.attention-{i + 1}-{safe}.png", f"{label} (task: {task or 'none'})"))
    return paths
