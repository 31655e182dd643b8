"""The embedding model: Qwen2-VL backbone → pooling → projection → L2 (see embedder.py).

Names are imported on first use: `import vipoly.model.inputs` (every Ray task that decodes images
for training) then does not import the embedder's transformers model code. transformers' own
processor imports pull in much of it anyway: a decoding task's first batch went from 4.85 to 4.59
CPU-seconds (docs/benchmarks.md, "What a fresh Ray process pays before it works")."""
from __future__ import annotations

from vipoly.lazy import lazy_names

_WHERE = {
    "COMPONENTS": "embedder", "EmbedOutput": "embedder", "PolyEmbedder": "embedder", "component_of": "embedder",
    "InputBuilder": "inputs", "decode_image": "inputs",
    "AttentionPooling": "pooling", "LastTokenPooling": "pooling", "MeanPooling": "pooling",
    "MultiHeadAttentionPooling": "pooling", "build_pooling": "pooling",
    "ProjectionHead": "projection", "matryoshka": "projection",
}
__all__ = [*_WHERE, "is_polyembedder_dir"]

from vipoly.folder import is_polyembedder_dir  # noqa: E402 - light (no torch)


__getattr__ = lazy_names(__name__, _WHERE)
