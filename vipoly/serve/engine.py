"""Embed a list of items the way the batch embedding job does: `InputBuilder.encode_one` per item,
`PolyEmbedder.collate` (packed where the attention is a varlen FlashAttention kind, i.e. on GPUs;
padded elsewhere), one forward pass per chunk under `encode`'s autocast. Items are sorted by length
first, as `encode` does, so a chunk pads little. Returns the vectors and each item's token count
(the `usage` of the OpenAI response)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vipoly.serve.api import Item


def embed_items(model, items: Sequence[Item], chunk: int = 64) -> tuple[np.ndarray, list[int]]:
    """→ (float32 (n, embedding_dim) unit rows, tokens per item)."""
    import torch

    rows = [model.inputs.encode_one(it.text, it.image, it.task) for it in items]
    tokens = [len(r["input_ids"]) for r in rows]
    out = np.empty((len(rows), model.embedding_dim), dtype=np.float32)
    order = np.argsort([-n for n in tokens], kind="stable")
    with torch.no_grad():
        for start in range(0, len(rows), chunk):
            idx = order[start:start + chunk]
            batch = {k: v.to(model.device) for k, v in model.collate([rows[i] for i in idx]).items()}
            with model._inference_autocast():
                out[idx] = model(**batch).embedding.float().cpu().numpy()
    return out, tokens
