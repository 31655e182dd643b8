"""Packed sequences: a batch without padding, one row of T = Σ n_b tokens, attention kept per document.

    rows (n_1, …, n_B tokens)  →  input_ids (1, T),  cu_seqlens = [0, n_1, n_1+n_2, …, T],
                                   seq_ids (1, T) = b for every token of row b,
                                   position_ids (4, 1, T) = [text positions; M-RoPE t, h, w]

Padding wastes the compute of every pad token (≈ 40% of a length-sorted batch of real data);
packing wastes none, and a packed batch has a single shape per token budget.

Design choices:
- Positions restart at 0 for each document, so a packed row sees exactly the positions it sees
  alone (or in a right-padded batch): `mrope_positions` is Qwen2-VL's `get_rope_index` for one row,
  written in numpy so that the data workers, which hold no model, can run it. A test checks it
  against the installed transformers' own function.
- Row 0 of `position_ids` is the plain text position (0…n_b−1 per document). transformers reads it
  to find the document boundaries: with no attention mask, `create_causal_mask` turns it into a
  block-diagonal causal mask (SDPA, eager) or block mask (FlexAttention); FlashAttention kernels get
  `cu_seqlens` directly (`attention_inputs`), so no T×T mask is ever built for them.
- Two varlen kernels: the `flash_attn` package (`attn_implementation="flash_attention_2"`) and
  PyTorch's own FlashAttention (`torch.nn.attention.varlen`, torch ≥ 2.9, CUDA, bf16/fp16),
  registered with transformers as `VARLEN` = "vipoly_varlen". That name falls back to SDPA for
  everything that is not a packed text batch (padded batches, the vision tower), so a model set to
  it behaves like an SDPA model everywhere else. On CPU the same name runs the per-document
  reference (SDPA on each document), which keeps its plumbing under test without a GPU.
- Pooling per document is segment arithmetic over the packed tokens (scatter max, index_add), no
  Python loop over documents; the weights come back in the padded (B, N) layout so monitoring and
  the attention visualisation read packed and padded outputs alike.
"""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vipoly.model.pooling import AttentionPooling, LastTokenPooling, MeanPooling, MultiHeadAttentionPooling

# torch.nn.attention.varlen.varlen_attn (torch ≥ 2.9) and its keyword names, bound by
# `register_varlen_attention`, before any attention call: importing it imports torch._dynamo
# (≈ 1 CPU-second), which processes that only tokenise or decode images never need; and
# inspect.signature inside the attention call would make torch.compile break the graph there.
varlen_attn = None
_VARLEN_PARAMS: frozenset[str] = frozenset()


def _bind_varlen() -> None:
    global varlen_attn, _VARLEN_PARAMS
    try:
        from torch.nn.attention.varlen import varlen_attn as kernel
    except ImportError:
        return
    varlen_attn, _VARLEN_PARAMS = kernel, frozenset(inspect.signature(kernel).parameters)

_SDPA_PRIORITY = {"set_priority": True} if "set_priority" in inspect.signature(sdpa_kernel).parameters else {}

VARLEN = "vipoly_varlen"
"""Attention implementation name for PyTorch's varlen FlashAttention (see `register_varlen_attention`)."""

VISION_VARLEN = "vipoly_flash_varlen"
"""The same kernel under a name with "flash" in it: transformers then sends Qwen2-VL's vision tower
down its cu_seqlens path (one varlen call per layer) instead of one SDPA call per image."""

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", VARLEN)
"""Implementations that take `cu_seqlens` (no T×T mask) for a packed batch."""

PACKED_KEYS = ("input_ids", "mm_token_type_ids", "position_ids", "cu_seqlens", "seq_ids")


# ---------------------------------------------------------------- positions
def mrope_positions(input_ids: np.ndarray, mm_token_type_ids: np.ndarray, image_grid_thw: np.ndarray | None,
                    merge: int) -> np.ndarray:
    """Qwen2-VL's 3-D rotary positions (t, h, w) of one unpadded row → (3, n) int64.

    Text tokens advance all three axes together by 1. A run of k image tokens from a grid (T, H, W)
    of patches gets, with h = H/merge, w = W/merge and s the position reached so far,
    (s + t', s + i, s + j) for t' < T, i < h, j < w in row-major order; the text after it resumes
    at s + max(h, w). This is `Qwen2VLModel.get_rope_index` for one row (video not supported).
    """
    ids = np.asarray(input_ids).reshape(-1)
    kinds = np.asarray(mm_token_type_ids).reshape(-1)
    n = ids.shape[0]
    out = np.empty((3, n), dtype=np.int64)
    grids = iter(np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3) if image_grid_thw is not None else ())
    starts = np.concatenate([[0], np.flatnonzero(np.diff(kinds)) + 1])
    ends = np.append(starts[1:], n)
    pos = 0
    for start, end in zip(starts.tolist(), ends.tolist()):  # one iteration per text or image run
        if kinds[start] == 0:
            out[:, start:end] = pos + np.arange(end - start)
            pos += end - start
            continue
        if kinds[start] != 1:
            raise ValueError(f"mm_token_type_ids has value {kinds[start]} (only text 0 and image 1 are packed)")
        grid = next(grids, None)
        if grid is None:
            raise ValueError("more <|image_pad|> runs than rows in image_grid_thw")
        t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
        if t * h * w != end - start:
            raise ValueError(f"an image run of {end - start} tokens does not match its grid {grid.tolist()} "
                             f"(merge {merge} → {t * h * w} tokens)")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        out[:, start:end] = pos + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
        pos += max(h, w)
    return out


def pack_rows(rows: list[dict[str, Any]], merge: int) -> dict[str, torch.Tensor]:
    """Rows from `InputBuilder.encode_one` → one packed batch (see the module docstring).

    Keys: input_ids, mm_token_type_ids, seq_ids (1, T); position_ids (4, 1, T); cu_seqlens (B+1,)
    int32; and, when any row has images, pixel_values and image_grid_thw concatenated in row order.
    """
    if not rows:
        raise ValueError("pack: no rows")
    ids = [np.asarray(r["input_ids"]).reshape(-1) for r in rows]
    lengths = np.array([len(x) for x in ids])
    if not lengths.all():
        raise ValueError(f"pack: row {int(np.argmin(lengths))} has no tokens")
    starts = np.concatenate([[0], np.cumsum(lengths)])
    input_ids = np.concatenate(ids).astype(np.int64)
    kinds = np.concatenate([np.asarray(r["mm_token_type_ids"]).reshape(-1) for r in rows]).astype(np.int32)
    # Text-only rows: every axis is the plain position; rows with images get their M-RoPE rows.
    positions = np.broadcast_to(np.arange(starts[-1]) - np.repeat(starts[:-1], lengths), (4, starts[-1])).copy()
    marked = np.add.reduceat(kinds != 0, starts[:-1]) > 0  # rows with image-token marks
    pixels, grids = [], []
    for i, r in enumerate(rows):
        pv, grid = r.get("pixel_values"), r.get("image_grid_thw")
        if pv is None or np.size(pv) == 0:
            if marked[i]:
                raise ValueError(f"pack: row {i}: mm_token_type_ids marks image tokens but the row has no image")
            continue
        a, b = starts[i], starts[i + 1]
        try:
            positions[1:, a:b] = mrope_positions(input_ids[a:b], kinds[a:b], grid, merge)
        except ValueError as e:
            raise ValueError(f"pack: row {i}: {e}") from None
        pixels.append(np.asarray(pv, dtype=np.float32).reshape(-1, np.shape(pv)[-1]))
        grids.append(np.asarray(grid, dtype=np.int64).reshape(-1, 3))
    batch = {
        "input_ids": torch.from_numpy(input_ids)[None],
        "mm_token_type_ids": torch.from_numpy(kinds)[None],
        "position_ids": torch.from_numpy(positions)[:, None],
        "cu_seqlens": torch.from_numpy(starts.astype(np.int32)),
        "seq_ids": torch.from_numpy(np.repeat(np.arange(len(rows)), lengths))[None],
    }
    if pixels:
        batch["pixel_values"] = torch.from_numpy(np.concatenate(pixels))
        batch["image_grid_thw"] = torch.from_numpy(np.concatenate(grids))
    return batch


def is_packed(batch: dict[str, Any]) -> bool:
    return batch.get("cu_seqlens") is not None


# ---------------------------------------------------------------- segments
def segment_softmax(scores: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Softmax within each document: a_i = exp(u_i − m_s) / Σ_{j∈s} exp(u_j − m_s), s = seq_ids[i].

    scores (T, …) float32, seq_ids (T,); m_s is the document's max (for a stable exp), taken with a
    scatter, so every document is normalised at once.
    """
    index = seq_ids.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores)
    top = scores.new_full((num_seqs, *scores.shape[1:]), float("-inf"))
    # The max only keeps exp in range; the softmax does not depend on it, so no gradient flows there.
    top = top.scatter_reduce(0, index, scores.detach(), reduce="amax", include_self=True)
    e = torch.exp(scores - top.gather(0, index))
    total = scores.new_zeros((num_seqs, *scores.shape[1:])).index_add(0, seq_ids, e)
    return e / total.gather(0, index)


def pool_packed(pooling: nn.Module, hidden: torch.Tensor, seq_ids: torch.Tensor,
                cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooler's formula per document of a packed row → (pooled (B, D) float32, weights).

    hidden (T, D); weights are per token, (T,) or (T, heads) for multi-head pooling.
    attention: c_s = Σ_{i∈s} softmax_s(h_i·v)_i h_i;  mean: c_s = Σ_{i∈s} h_i / n_s;  last: c_s = h_{end_s − 1}.
    """
    h = hidden.float()
    num_seqs = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if isinstance(pooling, MultiHeadAttentionPooling):
        k = pooling.num_heads
        hk = h.view(h.shape[0], k, -1)  # (T, heads, D/heads)
        weights = segment_softmax(torch.einsum("tkd,kd->tk", hk, pooling.context.float()), seq_ids, num_seqs)
        pooled = h.new_zeros((num_seqs, *hk.shape[1:])).index_add(0, seq_ids, weights[..., None] * hk)
        return pooled.reshape(num_seqs, -1), weights
    if isinstance(pooling, AttentionPooling):
        weights = segment_softmax(h @ pooling.context.float(), seq_ids, num_seqs)
    elif isinstance(pooling, MeanPooling):
        weights = 1.0 / lengths.float()[seq_ids]
    elif isinstance(pooling, LastTokenPooling):
        last = cu_seqlens[1:].long() - 1
        weights = h.new_zeros(h.shape[0]).index_fill(0, last, 1.0)
        return h[last], weights
    else:
        raise ValueError(f"no packed form for pooling {type(pooling).__name__}")
    return h.new_zeros(num_seqs, h.shape[1]).index_add(0, seq_ids, weights[:, None] * h), weights


def unpack(values: torch.Tensor, seq_ids: torch.Tensor, cu_seqlens: torch.Tensor,
           max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed per-token values (T, …) → right-padded (B, N, …) and the mask (B, N) long."""
    num_seqs = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n = int(lengths.max()) if max_len is None else max_len
    offset = torch.arange(values.shape[0], device=values.device) - cu_seqlens.long()[seq_ids]
    out = values.new_zeros((num_seqs, n, *values.shape[1:]))
    out[seq_ids, offset] = values
    mask = (torch.arange(n, device=values.device)[None] < lengths[:, None]).long()
    return out, mask


# ---------------------------------------------------------------- attention
def attention_inputs(attn_implementation: str, cu_seqlens: torch.Tensor, layer_types: list[str],
                     max_seqlen: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(attention_mask, kwargs) to hand the language model for a packed row.

    FlashAttention kinds: a mask mapping of None for every layer type (so transformers builds no
    mask) and the varlen arguments, computed once here instead of from the positions in every layer.
    Others (SDPA, eager, flex): no mask; transformers builds the block-diagonal one from the text
    positions in row 0 of `position_ids`.
    """
    if attn_implementation not in FLASH_IMPLEMENTATIONS:
        return None, {}
    cu = cu_seqlens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max()) if max_seqlen is None else max_seqlen
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return {t: None for t in set(layer_types)}, kwargs


def _varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None,
                      causal: bool) -> torch.Tensor:
    """What the varlen kernel computes, one document at a time with SDPA: the CPU stand-in."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (H, n, hd)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1)
    return out


def varlen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface for `VARLEN`: q, k, v (1, H, T, hd) → (1, T, H, hd).

    With `cu_seq_lens_q` in kwargs (a packed text batch): causal attention within each document,
    by `torch.nn.attention.varlen.varlen_attn` on CUDA and `_varlen_reference` elsewhere. Without:
    transformers' SDPA function, unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout:
        raise ValueError("vipoly_varlen attention has no dropout; set the model's attention_dropout to 0")
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch has batch size 1, got {query.shape[0]}")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (T, H, hd), as the kernel wants
    groups = q.shape[1] // k.shape[1]
    if query.is_cuda:
        params = _VARLEN_PARAMS
        # torch 2.10 takes is_causal; later versions a (left, right) window, (-1, 0) being causal.
        extra = {"window_size": (-1, 0) if causal else (-1, -1)} if "window_size" in params else {"is_causal": causal}
        if groups > 1:
            if "enable_gqa" in params:  # torch ≥ 2.12
                extra["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        longest = kwargs.get("max_length_q")
        longest = int((cu[1:] - cu[:-1]).max() if longest is None else longest)
        docs = cu.shape[0] - 1
        if not causal and groups == 1 and longest * docs == q.shape[0]:
            # Every document has the same length (a vision batch of equal-sized images): one dense
            # batched call, where cuDNN's kernel runs head_dim 80 at 1.6× the varlen kernel on an
            # H100 (bench/vision_attention.py).
            return dense_attention(q, k, v, docs, scaling)[None], None
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, **extra)
    else:
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = _varlen_reference(q, k, v, cu, scaling, causal)
    return out[None], None


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: int, scale: float | None) -> torch.Tensor:
    """Non-causal attention within `docs` equal-length documents packed in (T, H, hd) → (T, H, hd),
    as one batched SDPA call that prefers cuDNN, then FlashAttention, then the others."""
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    total, heads, dim = q.shape
    q, k, v = (x.view(docs, total // docs, heads, dim).transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(order, **_SDPA_PRIORITY):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(total, heads, dim)


def register_varlen_attention() -> str:
    """Make `VARLEN` and `VISION_VARLEN` valid `attn_implementation`s (attention function + SDPA's
    mask builder); idempotent. Returns VARLEN."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    _bind_varlen()
    for name in (VARLEN, VISION_VARLEN):
        AttentionInterface.register(name, varlen_attention_forward)
        AttentionMaskInterface.register(name, sdpa_mask)
    return VARLEN


def use_varlen(backbone: nn.Module) -> None:
    """Run `backbone` on the varlen kernel: VARLEN for the language model, VISION_VARLEN for a
    vision tower (the sub-config "vision_config").

    VARLEN goes through `set_attn_implementation`, which checks it; VISION_VARLEN is then written
    on the vision config itself. transformers ≥ 5.25 takes any name with "flash" in it, in
    `set_attn_implementation`, for a kernel to fetch from the Hub (and fails offline), while its
    vision tower only reads the name to choose the cu_seqlens path."""
    register_varlen_attention()
    backbone.set_attn_implementation(VARLEN)
    vision = getattr(backbone.config, "vision_config", None)
    if vision is not None:
        vision._attn_implementation = VISION_VARLEN


def varlen_available() -> bool:
    """PyTorch's varlen FlashAttention is usable: torch ≥ 2.9 with a CUDA device."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
