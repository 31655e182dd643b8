"""Cross-worker negatives: gather every worker's embeddings (with gradients) and score the local
rows against the whole global batch. The loss math (`dle.py`) never calls torch.distributed.

Why the per-worker loss is scaled by the world size W
----------------------------------------------------
Let L be the loss of the full global batch of N rows (`dle_loss` on the concatenation), and let
worker r hold rows R_r with embeddings a_r = f_θ(x_r). Worker r computes
    L_r = W · (1/N) Σ_{i∈R_r} λ_{t(i)} ℓ'_i  +  (1/N) λ_rank R Σ_{j text_pair, global} λ_{t(j)}
where ℓ'_i is ℓ_i without the rank term, and R (which couples pairs of rows held by different
workers) is computed whole on every worker. Then Σ_r L_r = W · L, i.e. mean_r L_r = L:
- the first parts partition the rows: Σ_r (1/N) Σ_{i∈R_r} λ ℓ'_i = L − rank part;
- the rank part is the same on all W workers, so it sums to W · rank part.
The all-gather's backward sums, on each worker, the gradients that *all* workers' losses send to its
rows, so worker r receives ∂(Σ_r' L_r')/∂a_r = W · ∂L/∂a_r and its parameter gradient is
W · (∂L/∂a_r)(∂a_r/∂θ). DDP (and DeepSpeed) average gradients over workers:
    (1/W) Σ_r W · (∂L/∂a_r)(∂a_r/∂θ) = ∂L/∂θ,
the single-process gradient of the full batch. Without the factor W the update would be W times
too small. tests/test_losses_gather.py checks both the value and the gradients with 2 processes.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor

from vipoly.losses.config import LossConfig
from vipoly.losses.dle import DLEStats, GlobalBatch, dle_loss, matryoshka_dle_loss

try:  # torch ≥ 2.13: the functional collective, whose backward is a reduce-scatter (SUM)
    from torch.distributed._functional_collectives import all_gather_single_autograd as _gather_fc
except ImportError:  # older torch: the autograd all_gather named in DESIGN.md (deprecated in 2.13)
    _gather_fc = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_autograd(x: Tensor) -> Tensor:
    """(m, ...) on each of W ranks → (W·m, ...); the backward sums every rank's gradient for x."""
    if _gather_fc is not None:
        return _gather_fc(x.contiguous(), 0, dist.group.WORLD)
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def batch_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's local batch size, in rank order ([n] when not distributed)."""
    if not is_distributed():
        return [n]
    out = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([n], dtype=torch.long, device=device))
    return [int(t) for t in out]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    return x if len(x) == rows else torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])


def _unpad(g: Tensor, sizes: list[int]) -> Tensor:
    m = max(sizes)
    if all(s == m for s in sizes):
        return g
    return torch.cat([g[r * m: r * m + s] for r, s in enumerate(sizes)])


def gather_with_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate every rank's x (B_r, ...) along dim 0, in rank order, keeping gradients: the
    backward sends each rank the sum over ranks of the gradient for its rows. Ranks may hold
    different B_r (rows are padded for the collective, then dropped). Identity when not distributed."""
    if not is_distributed():
        return x
    sizes = sizes or batch_sizes(len(x), x.device)
    return _unpad(_all_gather_autograd(_pad_rows(x, max(sizes))), sizes)


def gather(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """`gather_with_grad` without gradients (task ids, scores)."""
    if not is_distributed():
        return x
    sizes = sizes or batch_sizes(len(x), x.device)
    padded = _pad_rows(x.contiguous(), max(sizes))
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return _unpad(torch.cat(out), sizes)


def global_dle_loss(a: Tensor, b: Tensor, task_ids: Tensor, scores: Tensor, task_weights: Tensor,
                    cfg: LossConfig | None = None, *, dims: list[int] | None = None,
                    pos_keys: Tensor | None = None, negatives: Tensor | None = None,
                    neg_keys: Tensor | None = None, column_keys: Tensor | None = None) -> tuple[Tensor, DLEStats]:
    """`dle_loss` (or `matryoshka_dle_loss` when `dims` is given) with negatives from every worker.

    Inputs are this worker's rows. Returns (loss, stats) where `loss` is scaled as the module
    docstring derives, so that after DDP's gradient averaging the update equals the single-process
    update on the concatenated batch, and mean over workers of `loss` equals the full-batch loss.
    `stats` covers this worker's rows; `reduce_stats` sums them over workers (then
    `stats.task_weighted.sum()` is the full-batch loss). Falls back to the local batch when not
    distributed or when `cfg.gather_negatives` is off. `column_keys`: `candidates(pos_keys,
    neg_keys)` when the caller has it already (the loop counts masked pairs with it), so that the
    keys are gathered once.
    """
    cfg = cfg or LossConfig()
    loss_fn = dle_loss if dims is None else functools.partial(matryoshka_dle_loss, dims=dims)
    if not (cfg.gather_negatives and is_distributed()):
        return loss_fn(a, b, task_ids, scores, task_weights, cfg, pos_keys=pos_keys, negatives=negatives,
                       neg_keys=neg_keys)
    sizes = batch_sizes(len(a), a.device)
    rank = dist.get_rank()
    negs = None
    if negatives is not None:  # every rank passes them or none does (data.negatives is shared)
        neg_sizes = batch_sizes(len(negatives), a.device)
        if sum(neg_sizes):
            negs = gather_with_grad(negatives, neg_sizes)
    if column_keys is None and pos_keys is not None:
        column_keys = candidates(pos_keys, neg_keys if negatives is not None else None, cfg)
    n = sum(sizes)  # the columns: every worker's positives, then every worker's hard negatives
    batch = GlobalBatch(a=gather_with_grad(a, sizes), b=gather_with_grad(b, sizes),
                        task_ids=gather(task_ids, sizes), scores=gather(scores, sizes),
                        offset=sum(sizes[:rank]), world_size=len(sizes),
                        pos_keys=None if column_keys is None else column_keys[:n], negs=negs,
                        neg_keys=None if column_keys is None or negs is None or neg_keys is None else column_keys[n:])
    return loss_fn(a, b, task_ids, scores, task_weights, cfg, batch=batch, pos_keys=pos_keys)


def candidates(pos_keys: Tensor, neg_keys: Tensor | None = None, cfg: LossConfig | None = None) -> Tensor:
    """The keys of the columns this worker's rows are scored against, as `global_dle_loss` lays
    them out: every worker's positives, then every worker's hard negatives (or the local ones)."""
    cfg = cfg or LossConfig()
    if cfg.gather_negatives and is_distributed():
        pos_keys = gather(pos_keys, batch_sizes(len(pos_keys), pos_keys.device))
        if neg_keys is not None:
            neg_keys = gather(neg_keys, batch_sizes(len(neg_keys), neg_keys.device))
    return pos_keys if neg_keys is None else torch.cat([pos_keys, neg_keys])


def masked_pairs(pos_keys: Tensor, columns: Tensor, cfg: LossConfig | None = None) -> Tensor:
    """How many (row, column) pairs of this worker's rows `loss.mask_duplicates` masks: columns
    (keys from `candidates`) holding the row's positive, its own excepted. Sum it over workers for
    the step's count. 0 when masking is off."""
    cfg = cfg or LossConfig()
    if not cfg.mask_duplicates:
        return torch.zeros((), dtype=torch.int64, device=pos_keys.device)
    return (pos_keys[:, None] == columns[None, :]).sum() - len(pos_keys)


def reduce_stats(stats: DLEStats) -> DLEStats:
    """Sum `DLEStats` over all workers (one all-reduce); identity when not distributed."""
    if not is_distributed():
        return stats
    t = stats.to_tensor().clone()
    dist.all_reduce(t)
    return DLEStats.from_tensor(t)
