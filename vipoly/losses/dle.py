"""Dynamic Loss Equilibrium (DLE): each task's loss mix, as one vectorised batch loss (SPEC §2).

    L = (1/B) Σ_i λ_{t(i)} ℓ_i
    text_pair        ℓ_i = NCE_i + λ_score (ŝ_i − s_i)² + λ_rank R
    instr            ℓ_i = NCE_i + (1 − a_i·b_i)
    ocr, vqa_*       ℓ_i = NCE_i + λ_trip,t max(0, m_t − a_i·b_i + max_{j≠i} a_i·b_j)

with ŝ_i = (a_i·b_i + 1)/2 and R the margin-ranking mean over the batch's text_pair pairs
(`terms.margin_rank_pos`). Which terms a task gets comes from its `Recipe` (vipoly.tasks); how much
from `LossConfig`. `LossConfig.kind = infonce` is the ablation: ℓ_i = NCE_i for every task.

Design choices:
- Per-task masks, not per-task sub-batches: every term is computed for every row and multiplied by
  a 0/1 (or λ) vector indexed by task id. There is no Python loop over samples or tasks; the only
  data-dependent shape is the text_pair subset of the ranking term (O(n_tp²) instead of O(B²)).
- One similarity matrix S = a·bᵀ serves InfoNCE (both directions, S and Sᵀ), the positives a_i·b_i
  (its diagonal) and the triplet negatives.
- Cross-worker negatives: the caller passes the gathered batch (`GlobalBatch`); this module never
  calls torch.distributed. See `vipoly.losses.gather` for the gathering and for why the loss of a
  worker is scaled by the world size.
- Hard negatives (`negatives`, (M, D)): extra columns after the positives. They join a→b InfoNCE's
  denominator and the triplet's candidates; b→a stays over the queries. The similarity matrix is
  then (R, N + M).
- False negatives: with `pos_keys` (equal positives, equal keys) and `cfg.mask_duplicates`, column
  j is no candidate for row i ≠ j when b_j equals b_i: such a b_j is a positive of a_i, and a_j one
  of b_i. The masked similarities are −∞ before InfoNCE and the triplet's hardest negative.
- Embeddings in fp16/bf16 are upcast to fp32: with T = 0.07 the logits reach ±14, where bf16 keeps
  only about two decimal digits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vipoly.losses.config import LossConfig, LossKind, TripletNegatives
from vipoly.losses.terms import (cosine_pos, hardest_negatives, infonce_sim, margin_rank_pos, pair_similarity,
                                 score_mse_pos, triplet_hinge, triplet_sim)
from vipoly.tasks import TASK_SPECS, TASKS, Recipe

TERMS: tuple[str, ...] = ("nce", "mse", "rank", "cos", "triplet")
"""Raw (un-λ'd) loss terms reported in `DLEStats`, in this order."""


# ---------------------------------------------------------------- stats
@dataclass(frozen=True)
class DLEStats:
    """Detached per-batch statistics of `dle_loss`, kept as tensors (no host sync until read).

    Every field is a sum or a count over this call's rows, so the stats of several micro-batches or
    of several workers combine by addition (`to_tensor` → all-reduce SUM → `from_tensor`):
      task_sum (5,)       Σ_{i∈t} ℓ_i, the raw (unweighted) per-sample loss, TASKS order
      task_count (5,)     number of rows of each task
      task_weighted (5,)  (1/B) Σ_{i∈t} λ_t ℓ_i, task t's contribution to L (B = global batch size)
      term_sum (5,)       Σ of each raw term of `TERMS` over the rows that carry it
      term_count (5,)     number of rows that carry each term
    Tasks or terms absent from the batch have count 0: the dict views omit them, `task_mean` and
    `term_mean` hold NaN for them.
    """

    task_sum: Tensor
    task_count: Tensor
    task_weighted: Tensor
    term_sum: Tensor
    term_count: Tensor

    def to_tensor(self) -> Tensor:
        """All fields stacked, shape (5, 5), e.g. for one all-reduce."""
        return torch.stack([getattr(self, f.name) for f in dataclasses.fields(self)])

    @classmethod
    def from_tensor(cls, t: Tensor) -> DLEStats:
        return cls(*t.unbind(0))

    @classmethod
    def mean(cls, stats: list[DLEStats]) -> DLEStats:
        """Field-wise mean (used to summarise the Matryoshka prefixes)."""
        return cls.from_tensor(torch.stack([s.to_tensor() for s in stats]).mean(0))

    @property
    def task_mean(self) -> Tensor:
        """Mean raw ℓ per task, (5,), NaN where the task is absent."""
        return self.task_sum / self.task_count  # 0/0 = NaN marks absent tasks

    @property
    def term_mean(self) -> Tensor:
        return self.term_sum / self.term_count

    def task_losses(self) -> dict[str, float]:
        """{task: mean raw ℓ} over the tasks present: what `TaskWeighter.update` consumes."""
        mean, count = self.task_mean.tolist(), self.task_count.tolist()
        return {t: m for t, m, n in zip(TASKS, mean, count) if n > 0}

    def task_counts(self) -> dict[str, int]:
        return {t: int(n) for t, n in zip(TASKS, self.task_count.tolist())}

    def shares(self) -> dict[str, float]:
        """{task: its share of the weighted loss}, tasks present only; the shares sum to 1."""
        weighted, count = self.task_weighted.tolist(), self.task_count.tolist()
        total = sum(weighted)
        return {t: w / total if total else float("nan") for t, w, n in zip(TASKS, weighted, count) if n > 0}

    def terms(self) -> dict[str, float]:
        """{term: mean raw value} over the terms present in the batch."""
        mean, count = self.term_mean.tolist(), self.term_count.tolist()
        return {k: m for k, m, n in zip(TERMS, mean, count) if n > 0}

    def log_dict(self) -> dict[str, float]:
        """Flat metrics of the tasks/terms present: loss/<task>, share/<task>, count/<task>, term/<name>."""
        out: dict[str, float] = {f"loss/{t}": v for t, v in self.task_losses().items()}
        out |= {f"share/{t}": v for t, v in self.shares().items()}
        out |= {f"count/{t}": float(n) for t, n in self.task_counts().items()}
        out |= {f"term/{k}": v for k, v in self.terms().items()}
        return out


# ---------------------------------------------------------------- the global batch
@dataclass(frozen=True)
class GlobalBatch:
    """Every worker's batch concatenated in rank order (a, b gathered *with* gradients), and where
    this worker's rows start in it. `dle_loss` scores its own rows against all of it."""

    a: Tensor  # (N, D)
    b: Tensor  # (N, D)
    task_ids: Tensor  # (N,)
    scores: Tensor  # (N,)
    offset: int
    world_size: int
    pos_keys: Tensor | None = None  # (N,) int64: equal positives, equal keys (None: no masking)
    negs: Tensor | None = None  # (M, D) hard negatives of all workers (gathered with gradients)
    neg_keys: Tensor | None = None  # (M,) their keys


# ---------------------------------------------------------------- per-task recipe vectors
@dataclass(frozen=True)
class _RecipeTable:
    """Per-task coefficient vectors (5,), indexed by task id to give per-sample coefficients."""

    score: Tensor  # 1 for tasks with score MSE + margin ranking
    cos: Tensor  # 1 for tasks with the cosine term
    triplet: Tensor  # 1 for triplet tasks
    lambda_triplet: Tensor
    margin: Tensor


def _recipe_table(cfg: LossConfig, device: torch.device, dtype: torch.dtype) -> _RecipeTable:
    is_trip = [TASK_SPECS[t].recipe is Recipe.TRIPLET for t in TASKS]
    for field in ("lambda_triplet", "triplet_margin"):
        values: dict[str, float] = getattr(cfg, field)
        missing = [t for t, trip in zip(TASKS, is_trip) if trip and t not in values]
        extra = [t for t, trip in zip(TASKS, is_trip) if not trip and t in values]
        if missing or extra:
            raise ValueError(f"loss.{field} must name exactly the triplet tasks "
                             f"{[t for t, trip in zip(TASKS, is_trip) if trip]}; "
                             f"missing {missing}, not triplet tasks {extra}")

    def vec(values):
        return torch.tensor(values, dtype=dtype, device=device)

    return _RecipeTable(
        score=vec([TASK_SPECS[t].recipe is Recipe.SCORE_RANK for t in TASKS]),
        cos=vec([TASK_SPECS[t].recipe is Recipe.COSINE for t in TASKS]),
        triplet=vec(is_trip),
        lambda_triplet=vec([cfg.lambda_triplet.get(t, 0.0) for t in TASKS]),
        margin=vec([cfg.triplet_margin.get(t, 0.0) for t in TASKS]),
    )


def _check_inputs(a: Tensor, b: Tensor, task_ids: Tensor, scores: Tensor, task_weights: Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be (B, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    n = len(a)
    if n == 0:
        raise ValueError("empty batch: a and b have no rows")
    if task_ids.shape != (n,) or task_ids.is_floating_point() or task_ids.dtype == torch.bool:
        raise ValueError(f"task_ids must be an integer tensor of shape ({n},), got {task_ids.dtype} "
                         f"{tuple(task_ids.shape)}")
    if ((task_ids < 0) | (task_ids >= len(TASKS))).any():
        bad = sorted(set(task_ids[(task_ids < 0) | (task_ids >= len(TASKS))].tolist()))
        raise ValueError(f"task_ids must index TASKS {TASKS} (0..{len(TASKS) - 1}), got {bad}")
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},) (NaN where absent), got {tuple(scores.shape)}")
    if task_weights.shape != (len(TASKS),):
        raise ValueError(f"task_weights must have shape ({len(TASKS)},) in TASKS order {TASKS}, "
                         f"got {tuple(task_weights.shape)}")


def _as_float(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---------------------------------------------------------------- the loss
def dle_loss(a: Tensor, b: Tensor, task_ids: Tensor, scores: Tensor, task_weights: Tensor,
             cfg: LossConfig | None = None, *, batch: GlobalBatch | None = None,
             pos_keys: Tensor | None = None, negatives: Tensor | None = None,
             neg_keys: Tensor | None = None) -> tuple[Tensor, DLEStats]:
    """The DLE batch loss L = (1/B) Σ_i λ_{t(i)} ℓ_i (module docstring), and its `DLEStats`.

    a, b: (B, D) L2-normalised query / positive embeddings (not re-normalised here).
    task_ids: (B,) integer, index into TASKS. scores: (B,) gold similarity in [0, 1], NaN where
    absent (required for text_pair rows: NaN there raises ValueError). task_weights: (5,) λ_t in
    TASKS order (`TaskWeighter.as_tensor`). cfg: LossConfig (defaults when None).
    batch: the gathered global batch when negatives come from all workers; then a, b, task_ids,
    scores are this worker's rows, B is the global size, W the world size, and the returned loss is
        W · (1/B) Σ_{i local} λ_{t(i)} (ℓ_i − [text_pair] λ_rank R)
          + (1/B) Σ_{j global, text_pair} λ_{t(j)} λ_rank R
    whose mean over workers is L and whose DDP-averaged gradient is ∇L (see `gather.py`).
    pos_keys: (B,) int64 keys of the positives (this worker's rows; `batch.pos_keys` the global
    ones): with `cfg.mask_duplicates`, equal keys are not each other's negatives.
    negatives, neg_keys: (M, D) hard negatives and their keys (`batch.negs` when gathered): extra
    candidates of every row; a row's own positive among them is masked like a duplicate.
    """
    cfg = cfg or LossConfig()
    a, b = _as_float(a), _as_float(b)
    task_weights = torch.as_tensor(task_weights, dtype=a.dtype, device=a.device)
    _check_inputs(a, b, task_ids, scores, task_weights)
    local = batch is None
    batch = _global_batch(a, b, task_ids, scores, batch, pos_keys, negatives, neg_keys)
    rows, n = len(a), len(batch.a)
    targets = batch.offset + torch.arange(rows, device=a.device)  # (R,) each row's positive column
    sim_ab, sim_ba, same = _similarities(a, b, batch, targets, pos_keys, cfg, local)
    terms = _task_terms(sim_ab, sim_ba, same, targets, task_ids, scores, task_weights, batch, cfg)
    weight = task_weights[task_ids]  # (R,) λ_{t(i)}
    loss = (batch.world_size / n) * (weight * terms.per_row).sum() + terms.rank_loss / n
    return loss, _stats(terms, task_ids, task_weights, n, cfg)


def _global_batch(a: Tensor, b: Tensor, task_ids: Tensor, scores: Tensor, batch: GlobalBatch | None,
                  pos_keys: Tensor | None, negatives: Tensor | None, neg_keys: Tensor | None) -> GlobalBatch:
    """The batch the rows are scored against, in float32: the gathered one, or the rows themselves."""
    if batch is None:
        batch = GlobalBatch(a, b, task_ids, scores, offset=0, world_size=1, pos_keys=pos_keys,
                            negs=negatives, neg_keys=neg_keys)
    elif batch.a.shape[1] != a.shape[1] or not 0 <= batch.offset <= len(batch.a) - len(a):
        raise ValueError(f"global batch {tuple(batch.a.shape)} at offset {batch.offset} does not "
                         f"contain the local rows {tuple(a.shape)}")
    negs = None if batch.negs is None else _as_float(batch.negs)
    return dataclasses.replace(batch, a=_as_float(batch.a), b=_as_float(batch.b), negs=negs)


def _similarities(a: Tensor, b: Tensor, batch: GlobalBatch, targets: Tensor, pos_keys: Tensor | None,
                  cfg: LossConfig, local: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(S_ab, S_ba, same): the rows' similarities to every candidate, duplicates masked to −∞.

    S_ab (R, N + M): a_i · [b_j; negatives]. S_ba (R, N): b_i · a_j, or None where S_abᵀ serves
    (`local`: the rows are the whole batch, and no negatives). same (R, N + M) bool: the columns
    that are a row's positive's duplicates (cfg.mask_duplicates with keys), or None.
    """
    n, negs = len(batch.a), batch.negs
    sim_ab = a @ (batch.b if negs is None else torch.cat([batch.b, negs])).T  # (R, N + M)
    if not local:
        sim_ba = b @ batch.a.T  # (R, N)
    else:  # b_i·a_j = S[j, i]: the one matrix serves both directions (Sᵀ, or its positives' part)
        sim_ba = None if negs is None else sim_ab[:, :n].T
    same = None
    if cfg.mask_duplicates and pos_keys is not None and batch.pos_keys is not None:
        if negs is not None and batch.neg_keys is None:
            raise ValueError("dle_loss: hard negatives need their keys (neg_keys) when positives have keys")
        keys = batch.pos_keys if negs is None else torch.cat([batch.pos_keys, batch.neg_keys])  # (N + M,)
        same = duplicate_mask(pos_keys, keys, targets)  # (R, N + M) bool
        sim_ab = sim_ab.masked_fill(same, float("-inf"))
        if sim_ba is not None:  # b_i·a_j: a_j is a positive of b_i when b_j equals b_i
            sim_ba = sim_ba.masked_fill(same[:, :n], float("-inf"))
    return sim_ab, sim_ba, same


@dataclass(frozen=True)
class _Terms:
    """The loss terms of each row (R,), before the task weights; None where the recipe has none."""

    nce: Tensor
    per_row: Tensor  # ℓ_i without the margin-ranking term
    rank_loss: Tensor  # () λ_rank R Σ_j λ_{t(j)} [text_pair j] over the global batch
    rank: Tensor | None = None  # () R, the margin-ranking loss of the global batch's text pairs
    mse: Tensor | None = None
    cos: Tensor | None = None
    trip: Tensor | None = None
    score_on: Tensor | None = None  # (R,) 1 where the row's task has score MSE + ranking
    cos_on: Tensor | None = None
    trip_on: Tensor | None = None


def _task_terms(sim_ab: Tensor, sim_ba: Tensor | None, same: Tensor | None, targets: Tensor, task_ids: Tensor,
                scores: Tensor, task_weights: Tensor, batch: GlobalBatch, cfg: LossConfig) -> _Terms:
    """Each row's recipe (tasks.py): InfoNCE for all, plus score MSE and margin ranking, cosine, or
    a triplet hinge by task."""
    nce = infonce_sim(sim_ab, sim_ba, targets, cfg.temperature)  # (R,)
    if cfg.kind is LossKind.INFONCE:
        return _Terms(nce=nce, per_row=nce, rank_loss=nce.new_zeros(()))
    table = _recipe_table(cfg, sim_ab.device, sim_ab.dtype)
    score_on = table.score[task_ids]  # (R,)
    _check_scores(scores, score_on)
    cos_on, trip_on = table.cos[task_ids], table.triplet[task_ids]
    pos, trip = _positives_and_triplet(sim_ab, targets, table.margin[task_ids], cfg.triplet_negatives, same)
    mse = score_mse_pos(pos, torch.where(score_on > 0, scores, torch.zeros_like(scores)))  # (R,)
    cos = cosine_pos(pos)  # (R,)
    # R couples every text_pair pair of the *global* batch, so each worker computes it whole
    # (O(N²) scalars, no matmul) and adds it unscaled: see dle_loss's formula.
    score_all = table.score[batch.task_ids]  # (N,)
    whole = batch.world_size == 1 and len(batch.a) == len(targets)
    pos_all = pos if whole else pair_similarity(batch.a, batch.b)  # (N,)
    rank = margin_rank_pos(pos_all, batch.scores, cfg.rank_margin, score_all > 0)  # ()
    per_row = nce + score_on * cfg.lambda_score * mse + cos_on * cos + table.lambda_triplet[task_ids] * trip
    rank_loss = cfg.lambda_rank * rank * (task_weights[batch.task_ids] * score_all).sum()
    return _Terms(nce, per_row, rank_loss, rank, mse, cos, trip, score_on, cos_on, trip_on)


@torch.no_grad()
def _stats(terms: _Terms, task_ids: Tensor, task_weights: Tensor, n: int, cfg: LossConfig) -> DLEStats:
    """The rows' raw losses per task and per term (what STW and the logs read)."""
    nce = terms.nce
    onehot = F.one_hot(task_ids.long(), len(TASKS)).to(nce.dtype)  # (R, 5)
    ones = torch.ones_like(nce)
    if terms.rank is None:
        raw = nce.detach()
        zero = nce.new_zeros(())
        term_sum = torch.stack([nce.sum(), zero, zero, zero, zero])
        term_count = torch.stack([ones.sum(), zero, zero, zero, zero])
    else:
        score_on, cos_on, trip_on = terms.score_on, terms.cos_on, terms.trip_on
        raw = (terms.per_row + score_on * cfg.lambda_rank * terms.rank).detach()  # (R,)
        term_sum = torch.stack([nce.sum(), (score_on * terms.mse).sum(), score_on.sum() * terms.rank,
                                (cos_on * terms.cos).sum(), (trip_on * terms.trip).sum()])
        term_count = torch.stack([ones.sum(), score_on.sum(), score_on.sum(), cos_on.sum(), trip_on.sum()])
    task_sum = onehot.T @ raw  # (5,)
    return DLEStats(task_sum=task_sum, task_count=onehot.sum(0), task_weighted=task_weights * task_sum / n,
                    term_sum=term_sum.detach(), term_count=term_count)


def _positives_and_triplet(sim_ab: Tensor, targets: Tensor, margin: Tensor, negatives: TripletNegatives,
                           masked: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(a_i·b_i, triplet_i) for each row; the default (hardest) path reads both similarities with
    one gather, so the (R, N) similarity matrix gets one extra gradient pass for all of DLE.
    `masked` (R, N): columns that are no negative of the row (their similarity is −∞ already)."""
    if negatives is TripletNegatives.HARDEST and sim_ab.shape[1] >= 2:
        pos, neg = sim_ab.gather(1, torch.stack([targets, hardest_negatives(sim_ab, targets)], 1)).unbind(1)
        return pos, triplet_hinge(pos, neg, margin)  # a row with no negative left: neg = −∞, hinge 0
    excluded = None if masked is None else masked.sum(1)
    return sim_ab.gather(1, targets[:, None]).squeeze(1), triplet_sim(sim_ab, targets, margin, negatives, excluded)


def duplicate_mask(keys: Tensor, all_keys: Tensor, targets: Tensor) -> Tensor:
    """(R, N) bool: column j holds the same positive as row i (equal keys), j not i's own column."""
    same = keys[:, None] == all_keys[None, :]
    same[torch.arange(len(keys), device=keys.device), targets] = False
    return same


def _check_scores(scores: Tensor, score_on: Tensor) -> None:
    bad = torch.isnan(scores) & (score_on > 0)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        names = [t for t in TASKS if TASK_SPECS[t].recipe is Recipe.SCORE_RANK]
        raise ValueError(f"scores: {names} sample(s) at batch index {idx[:10]}{' …' if len(idx) > 10 else ''} "
                         f"have a NaN score; these tasks need gold scores in [0, 1]")


def matryoshka_dle_loss(a: Tensor, b: Tensor, task_ids: Tensor, scores: Tensor, task_weights: Tensor,
                        cfg: LossConfig | None = None, dims: list[int] | tuple[int, ...] = (1024, 512, 256, 128),
                        *, batch: GlobalBatch | None = None, pos_keys: Tensor | None = None,
                        negatives: Tensor | None = None, neg_keys: Tensor | None = None
                        ) -> tuple[Tensor, DLEStats]:
    """Matryoshka DLE (Kusupati et al. 2022): the mean over d ∈ dims of `dle_loss` on the first d
    coordinates, re-normalised (a prefix of a unit vector is not a unit vector), so that truncated
    embeddings stay useful. Stats are the field-wise mean over the prefixes (their weighted parts
    still sum to the returned loss)."""
    width = a.shape[-1]
    if not dims or any(not 1 <= d <= width for d in dims):
        raise ValueError(f"model.projection.matryoshka_dims must be in [1, {width}] (the embedding size), "
                         f"got {list(dims)}")
    losses, stats = [], []
    for d in dims:
        sub = None
        if batch is not None:
            sub = dataclasses.replace(batch, a=F.normalize(batch.a[:, :d], dim=-1),
                                      b=F.normalize(batch.b[:, :d], dim=-1),
                                      negs=None if batch.negs is None else F.normalize(batch.negs[:, :d], dim=-1))
        loss, st = dle_loss(F.normalize(a[:, :d], dim=-1), F.normalize(b[:, :d], dim=-1), task_ids, scores,
                            task_weights, cfg, batch=sub, pos_keys=pos_keys, neg_keys=neg_keys,
                            negatives=None if negatives is None else F.normalize(negatives[:, :d], dim=-1))
        losses.append(loss)
        stats.append(st)
    return torch.stack(losses).mean(), DLEStats.mean(stats)
