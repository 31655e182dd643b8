"""Every loss term and the DLE composition against a plain float64 loop over samples (values and
gradients), plus the stats, task weighting, the InfoNCE ablation, Matryoshka and bad inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vipoly.losses.config import LossConfig, LossKind, TripletNegatives
from vipoly.losses import (DLEStats, GlobalBatch, cosine, dle_loss, infonce, margin_rank, matryoshka_dle_loss,
                           score_mse, triplet)
from vipoly.tasks import TASKS

TP, INSTR, OCR, VQA1, VQAM = range(5)
F64 = torch.float64


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=-1)


def batch(task_ids: list[int], d: int = 6, seed: int = 0, scores: list[float] | None = None):
    """Random unit a, b (b correlated with a so losses are not all saturated), ids, scores."""
    n = len(task_ids)
    a = unit(n, d, seed)
    b = F.normalize(a + 0.8 * unit(n, d, seed + 1), dim=-1)
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.tensor(task_ids)
    s = torch.rand(n, generator=g, dtype=F64) if scores is None else torch.tensor(scores, dtype=F64)
    s = torch.where(ids == TP, s, torch.full_like(s, float("nan")))
    return a, b, ids, s


# ---------------------------------------------------------------- plain loops (the reference)
def dot(u, v):
    return sum(u[k] * v[k] for k in range(len(u)))


def candidates(n, i, keys=None):
    """Columns that row i scores against: all, less those holding the same positive (keys)."""
    return [j for j in range(n) if keys is None or j == i or keys[j] != keys[i]]


def hard(i, keys=None, hard_negs=None):
    """Row i's hard negatives (a list of (vector, key)), less those holding its own positive."""
    return [v for v, k in (hard_negs or []) if keys is None or k != keys[i]]


def loop_nce(a, b, i, temp, keys=None, hard_negs=None):
    cols = candidates(len(a), i, keys)
    row_ab = [dot(a[i], b[j]) / temp for j in cols] + [dot(a[i], v) / temp for v in hard(i, keys, hard_negs)]
    row_ba = [dot(b[i], a[j]) / temp for j in cols]  # b→a: the queries only
    ce = lambda row: torch.log(sum(torch.exp(x) for x in row)) - row[cols.index(i)]  # noqa: E731
    return 0.5 * (ce(row_ab) + ce(row_ba))


def loop_triplet(a, b, i, margin, negatives="hardest", keys=None, hard_negs=None):
    others = [dot(a[i], b[j]) for j in candidates(len(a), i, keys) if j != i]
    others += [dot(a[i], v) for v in hard(i, keys, hard_negs)]
    if not others:
        return torch.zeros((), dtype=F64)
    pos = dot(a[i], b[i])
    if negatives == "hardest":
        hardest = max(others, key=lambda x: x.item())
        return torch.relu(margin - pos + hardest)
    return sum(torch.relu(margin - pos + s) for s in others) / len(others)


def loop_rank(a, b, ids, scores, margin):
    tp = [i for i in range(len(a)) if ids[i] == TP]
    pred = {i: (dot(a[i], b[i]) + 1) / 2 for i in tp}
    terms = [torch.relu(margin - (pred[i] - pred[j])) for i in tp for j in tp if scores[i] > scores[j]]
    return sum(terms) / len(terms) if terms else torch.zeros((), dtype=F64)


def loop_dle(a, b, ids, scores, weights, cfg: LossConfig, keys=None, hard_negs=None):
    """(L, [ℓ_i]) by the definition in DESIGN.md, one sample at a time; `keys`: equal keys are not
    each other's negatives; `hard_negs`: [(vector, key)], extra candidates of every row."""
    ids, scores = ids.tolist(), scores.tolist()
    rank = loop_rank(a, b, ids, scores, cfg.rank_margin)
    per = []
    for i in range(len(a)):
        task = TASKS[ids[i]]
        ell = loop_nce(a, b, i, cfg.temperature, keys, hard_negs)
        if cfg.kind is LossKind.DLE:
            pos = dot(a[i], b[i])
            if task == "text_pair":
                ell = ell + cfg.lambda_score * ((pos + 1) / 2 - scores[i]) ** 2 + cfg.lambda_rank * rank
            elif task == "instr":
                ell = ell + (1 - pos)
            else:
                ell = ell + cfg.lambda_triplet[task] * loop_triplet(
                    a, b, i, cfg.triplet_margin[task], cfg.triplet_negatives.value, keys, hard_negs)
        per.append(ell)
    total = sum(weights[ids[i]] * per[i] for i in range(len(a))) / len(a)
    return total, per


# ---------------------------------------------------------------- single terms
def test_infonce_matches_loop():
    a, b, _, _ = batch([0] * 7, seed=3)
    got = infonce(a, b, 0.2)
    want = torch.stack([loop_nce(a, b, i, 0.2) for i in range(7)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_infonce_symmetric_in_a_and_b():
    a, b, _, _ = batch([0] * 5, seed=4)
    torch.testing.assert_close(infonce(a, b, 0.07), infonce(b, a, 0.07))


def test_score_mse_and_cosine_match_loop():
    a, b, _, _ = batch([0] * 5, seed=5)
    s = torch.rand(5, dtype=F64)
    mse = torch.stack([((dot(a[i], b[i]) + 1) / 2 - s[i]) ** 2 for i in range(5)])
    torch.testing.assert_close(score_mse(a, b, s), mse)
    torch.testing.assert_close(cosine(a, b), torch.stack([1 - dot(a[i], b[i]) for i in range(5)]))


@pytest.mark.parametrize("scores", [[0.9, 0.1, 0.5, 0.5, 0.3], [0.4, 0.4, 0.4, 0.4, 0.4], [0.2, 0.8, 0.8, 0.1, 0.6]])
def test_margin_rank_matches_loop_with_ties(scores):
    a, b, ids, s = batch([TP] * 5, seed=6, scores=scores)
    want = loop_rank(a, b, ids.tolist(), s.tolist(), 0.05)
    torch.testing.assert_close(margin_rank(a, b, s, 0.05), want)


def test_margin_rank_without_pairs_is_zero_and_mask_excludes_other_tasks():
    a, b, _, _ = batch([TP] * 4, seed=7)
    assert margin_rank(a, b, torch.full((4,), 0.5, dtype=F64), 0.05).item() == 0.0  # all tied
    s = torch.tensor([0.9, float("nan"), 0.1, float("nan")], dtype=F64)
    mask = torch.tensor([True, False, True, False])
    got = margin_rank(a, b, s, 0.3, mask)
    want = loop_rank(a, b, [TP, INSTR, TP, INSTR], s.tolist(), 0.3)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("negatives", ["hardest", "mean"])
def test_triplet_matches_loop_with_per_sample_margins(negatives):
    a, b, _, _ = batch([0] * 6, seed=8)
    margins = torch.tensor([0.2, 0.3, 0.2, 0.3, 0.5, 0.0], dtype=F64)
    got = triplet(a, b, margins, negatives)
    want = torch.stack([loop_triplet(a, b, i, margins[i], negatives) for i in range(6)])
    torch.testing.assert_close(got, want)
    assert (got > 0).any(), "margins too small for a meaningful test"


@pytest.mark.parametrize("negatives", ["hardest", "mean"])
def test_triplet_when_a_negative_ties_with_the_positive(negatives):
    a, b, _, _ = batch([0] * 4, seed=10)
    b = torch.cat([b[:1], b[:1], b[2:]])  # samples 0 and 1 share a positive: a_0·b_1 = a_0·b_0
    got = triplet(a, b, 0.2, negatives)
    want = torch.stack([loop_triplet(a, b, i, 0.2, negatives) for i in range(4)])
    torch.testing.assert_close(got, want)
    if negatives == "hardest":
        assert got[0].item() == pytest.approx(0.2)  # its hardest negative is as close as its positive


def test_triplet_single_sample_has_no_negative():
    a, b, _, _ = batch([0], seed=9)
    assert triplet(a, b, 0.2).item() == 0.0
    assert triplet(a, b, 0.2, "mean").item() == 0.0


# ---------------------------------------------------------------- DLE
CASES = {
    "mixed": ([TP, INSTR, OCR, VQA1, VQAM, TP, TP, OCR, VQAM, INSTR, TP], {}),
    "no_text_pair": ([INSTR, OCR, VQA1, VQAM, OCR, VQAM], {}),
    "one_text_pair": ([TP, OCR, INSTR, VQAM], {}),
    "ties": ([TP, TP, TP, TP, OCR, INSTR], {"scores": [0.5, 0.5, 0.2, 0.5, 0.0, 0.0]}),
    "mean_negatives_T02": ([TP, INSTR, OCR, VQA1, VQAM, TP, VQAM],
                           {"cfg": {"triplet_negatives": "mean", "temperature": 0.2}}),
    "only_text_pair": ([TP] * 5, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_dle_value_and_gradient_match_float64_loop(case):
    ids, extra = CASES[case]
    cfg = LossConfig(**extra.get("cfg", {}))
    a, b, ids_t, s = batch(ids, seed=len(case), scores=extra.get("scores"))
    w = torch.tensor([0.27, 1.3, 1.0, 0.9, 0.8], dtype=F64)

    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss, stats = dle_loss(a1, b1, ids_t, s, w, cfg)
    loss.backward()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    want, per = loop_dle(a2, b2, ids_t, s, w, cfg)
    want.backward()

    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-10, atol=1e-12)
    # stats: per-task mean raw ℓ and counts, absent tasks omitted / NaN
    per = torch.stack(per).detach()
    present = sorted(set(ids))
    losses = stats.task_losses()
    assert list(losses) == [TASKS[k] for k in present]
    for k in present:
        assert math.isclose(losses[TASKS[k]], per[ids_t == k].mean().item(), rel_tol=1e-10, abs_tol=1e-12)
    assert all(math.isnan(stats.task_mean[k]) for k in range(5) if k not in present)
    assert stats.task_counts() == {t: ids.count(k) for k, t in enumerate(TASKS)}
    assert math.isclose(stats.task_weighted.sum().item(), loss.item(), rel_tol=1e-12)
    assert math.isclose(sum(stats.shares().values()), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("negatives", ["hardest", "mean"])
def test_duplicate_positives_are_masked_like_the_loop(negatives):
    """Rows 0, 1 and 5 share a positive (VQA answers "yes"), rows 3 and 7 another: none is a
    negative of the others, in InfoNCE's two directions and the triplet term; value and gradient
    equal the float64 loop, whole or split over two workers."""
    ids = [VQA1, VQA1, OCR, TP, VQAM, VQA1, INSTR, TP]
    keys = [7, 7, 3, 1, 2, 7, 5, 1]
    cfg = LossConfig(triplet_negatives=negatives)
    a, b, ids_t, s = batch(ids, seed=21)
    w = torch.tensor([0.27, 1.3, 1.0, 0.9, 0.8], dtype=F64)
    keys_t = torch.tensor(keys)

    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss, _ = dle_loss(a1, b1, ids_t, s, w, cfg, pos_keys=keys_t)
    ga, gb = torch.autograd.grad(loss, (a1, b1))
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    want, _ = loop_dle(a2, b2, ids_t, s, w, cfg, keys)
    wa, wb = torch.autograd.grad(want, (a2, b2))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, wa, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, wb, rtol=1e-10, atol=1e-12)
    unmasked, _ = loop_dle(a, b, ids_t, s, w, cfg)
    assert abs(loss.item() - unmasked.item()) > 1e-6  # the mask changed something
    off, _ = dle_loss(a, b, ids_t, s, w, LossConfig(triplet_negatives=negatives, mask_duplicates=False),
                      pos_keys=keys_t)
    torch.testing.assert_close(off, unmasked, rtol=1e-12, atol=1e-12)

    parts = []
    for lo, hi in [(0, 3), (3, 8)]:  # two "workers": their keys against the gathered ones
        gbatch = GlobalBatch(a, b, ids_t, s, offset=lo, world_size=2, pos_keys=keys_t)
        parts.append(dle_loss(a[lo:hi], b[lo:hi], ids_t[lo:hi], s[lo:hi], w, cfg, batch=gbatch,
                              pos_keys=keys_t[lo:hi])[0])
    torch.testing.assert_close(torch.stack(parts).mean(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("negatives", ["hardest", "mean"])
def test_hard_negatives_join_the_candidates_like_the_loop(negatives):
    """Five hard negatives (one equal to row 2's own positive: masked for it) as extra columns of
    every row: value and gradient (of a, b and the negatives) equal the float64 loop, whole or
    split over two workers; without keys none is masked."""
    ids = [TP, OCR, VQA1, INSTR, VQAM, TP]
    keys = torch.tensor([1, 2, 3, 4, 5, 6])
    cfg = LossConfig(triplet_negatives=negatives)
    a, b, ids_t, s = batch(ids, seed=23)
    negs = F.normalize(b[:5].flip(0) + 0.5 * unit(5, 6, 24), dim=-1)
    neg_keys = torch.tensor([9, 3, 8, 7, 9])  # the second holds row 2's positive
    w = torch.tensor([0.27, 1.3, 1.0, 0.9, 0.8], dtype=F64)

    leaves = [x.clone().requires_grad_() for x in (a, b, negs)]
    loss, _ = dle_loss(leaves[0], leaves[1], ids_t, s, w, cfg, pos_keys=keys, negatives=leaves[2], neg_keys=neg_keys)
    got = torch.autograd.grad(loss, leaves)
    ref = [x.clone().requires_grad_() for x in (a, b, negs)]
    want, _ = loop_dle(ref[0], ref[1], ids_t, s, w, cfg, keys.tolist(), list(zip(ref[2], neg_keys.tolist())))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for g, r in zip(got, torch.autograd.grad(want, ref)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)

    plain, _ = dle_loss(a, b, ids_t, s, w, cfg, negatives=negs)  # no keys: nothing masked
    torch.testing.assert_close(plain, loop_dle(a, b, ids_t, s, w, cfg, hard_negs=[(v, None) for v in negs])[0],
                               rtol=1e-12, atol=1e-12)
    parts = []
    for lo, hi in [(0, 4), (4, 6)]:
        gbatch = GlobalBatch(a, b, ids_t, s, offset=lo, world_size=2, pos_keys=keys, negs=negs, neg_keys=neg_keys)
        parts.append(dle_loss(a[lo:hi], b[lo:hi], ids_t[lo:hi], s[lo:hi], w, cfg, batch=gbatch, pos_keys=keys[lo:hi])[0])
    torch.testing.assert_close(torch.stack(parts).mean(), want, rtol=1e-12, atol=1e-12)


def test_a_row_whose_every_candidate_is_its_own_positive():
    """Two rows with one positive: no negative is left, InfoNCE is 0 and nothing is NaN."""
    a, b, ids_t, s = batch([OCR, OCR], seed=22)
    a1 = a.clone().requires_grad_()
    loss, stats = dle_loss(a1, b, ids_t, s, torch.ones(5, dtype=F64), pos_keys=torch.tensor([4, 4]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a1.grad).all()
    assert stats.terms()["nce"] == pytest.approx(0.0, abs=1e-12) and stats.terms()["triplet"] == 0.0


def test_stats_terms_are_raw_means():
    ids = [TP, TP, INSTR, OCR, VQAM, VQA1]
    a, b, ids_t, s = batch(ids, seed=11)
    cfg = LossConfig()
    _, stats = dle_loss(a, b, ids_t, s, torch.ones(5), cfg)
    terms = stats.terms()
    nce = torch.stack([loop_nce(a, b, i, cfg.temperature) for i in range(6)])
    assert math.isclose(terms["nce"], nce.mean().item(), rel_tol=1e-12)
    assert math.isclose(terms["mse"], score_mse(a, b, s)[:2].mean().item(), rel_tol=1e-12)
    rank = loop_rank(a, b, ids, s.tolist(), cfg.rank_margin).item()
    assert math.isclose(terms["rank"], rank, rel_tol=1e-12, abs_tol=1e-15)
    assert math.isclose(terms["cos"], cosine(a, b)[2].item(), rel_tol=1e-12)
    margins = torch.tensor([0.0] * 3 + [cfg.triplet_margin[TASKS[k]] for k in ids[3:]], dtype=F64)
    assert math.isclose(terms["triplet"], triplet(a, b, margins)[3:].mean().item(), rel_tol=1e-12)
    log = stats.log_dict()
    assert {"loss/text_pair", "share/ocr", "count/vqa_multi", "term/rank"} <= set(log)


def test_stats_add_up_over_parts():
    a, b, ids, s = batch([TP, OCR, INSTR, TP], seed=12)
    _, st = dle_loss(a, b, ids, s, torch.ones(5))
    back = DLEStats.from_tensor(st.to_tensor() + st.to_tensor())
    assert back.task_losses() == pytest.approx(st.task_losses())
    assert back.task_counts()["text_pair"] == 4


def test_task_weights_scale_the_loss():
    a, b, ids, s = batch([TP, INSTR, OCR, VQA1, VQAM, OCR], seed=13)
    base, st = dle_loss(a, b, ids, s, torch.ones(5, dtype=F64))
    twice, _ = dle_loss(a, b, ids, s, 2 * torch.ones(5, dtype=F64))
    torch.testing.assert_close(twice, 2 * base)
    only_ocr, st_ocr = dle_loss(a, b, ids, s, torch.tensor([0, 0, 3.0, 0, 0], dtype=F64))
    torch.testing.assert_close(only_ocr, torch.tensor(3.0 * st.task_sum[OCR].item() / 6, dtype=F64))
    assert st_ocr.task_losses() == pytest.approx(st.task_losses())  # stats are raw: λ does not change them
    assert st_ocr.shares()["ocr"] == pytest.approx(1.0)


def test_infonce_ablation_uses_only_nce_and_ignores_scores():
    ids = [TP, INSTR, OCR, VQA1, VQAM, TP]
    a, b, ids_t, s = batch(ids, seed=14)
    s[0] = float("nan")  # a text_pair without a score is fine when no score term is used
    w = torch.tensor([0.5, 1.0, 2.0, 1.0, 0.7], dtype=F64)
    cfg = LossConfig(kind="infonce")
    loss, stats = dle_loss(a, b, ids_t, s, w, cfg)
    torch.testing.assert_close(loss, (w[ids_t] * infonce(a, b, cfg.temperature)).mean())
    want, _ = loop_dle(a, b, ids_t, s, w, cfg)
    torch.testing.assert_close(loss, want)
    assert set(stats.terms()) == {"nce"}


def test_low_precision_inputs_are_computed_in_fp32():
    a, b, ids, s = batch([TP, OCR, INSTR, VQAM, TP], d=16, seed=15)
    w = torch.ones(5)
    ref, _ = dle_loss(a.float(), b.float(), ids, s.float(), w)
    got, _ = dle_loss(a.bfloat16(), b.bfloat16(), ids, s.float(), w)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 0.05 * ref.item()


def test_global_batch_scaling_single_process():
    """Two "workers" on one process: mean of their losses is L and the sum of their gradients
    (what the all-gather backward delivers) is W·∇L, which DDP's average turns into ∇L."""
    ids = [TP, OCR, TP, INSTR, VQAM, TP, VQA1, OCR]
    a, b, ids_t, s = batch(ids, seed=16)
    w = torch.tensor([0.3, 1.2, 1.0, 1.0, 0.8], dtype=F64)
    a_all, b_all = a.clone().requires_grad_(), b.clone().requires_grad_()
    full, full_stats = dle_loss(a_all, b_all, ids_t, s, w)
    ga, gb = torch.autograd.grad(full, (a_all, b_all))

    parts, stats = [], []
    for lo, hi in [(0, 5), (5, 8)]:  # unequal shares
        gbatch = GlobalBatch(a_all, b_all, ids_t, s, offset=lo, world_size=2)
        loss, st = dle_loss(a_all[lo:hi], b_all[lo:hi], ids_t[lo:hi], s[lo:hi], w, batch=gbatch)
        parts.append(loss)
        stats.append(st)
    torch.testing.assert_close(torch.stack(parts).mean(), full)
    sa, sb = torch.autograd.grad(sum(parts), (a_all, b_all))
    torch.testing.assert_close(sa, 2 * ga)
    torch.testing.assert_close(sb, 2 * gb)
    summed = DLEStats.from_tensor(stats[0].to_tensor() + stats[1].to_tensor())
    torch.testing.assert_close(summed.to_tensor(), full_stats.to_tensor())


def test_matryoshka_is_the_mean_over_renormalised_prefixes():
    a, b, ids, s = batch([TP, OCR, INSTR, VQAM, TP, VQA1], d=8, seed=17)
    w = torch.ones(5, dtype=F64)
    one, _ = matryoshka_dle_loss(a, b, ids, s, w, dims=[8])
    torch.testing.assert_close(one, dle_loss(a, b, ids, s, w)[0])
    got, stats = matryoshka_dle_loss(a, b, ids, s, w, dims=[8, 4])
    half, _ = dle_loss(F.normalize(a[:, :4], dim=-1), F.normalize(b[:, :4], dim=-1), ids, s, w)
    torch.testing.assert_close(got, (one + half) / 2)
    torch.testing.assert_close(stats.task_weighted.sum(), got)
    with pytest.raises(ValueError, match="matryoshka_dims"):
        matryoshka_dle_loss(a, b, ids, s, w, dims=[16, 8])


# ---------------------------------------------------------------- bad inputs
def test_nan_text_pair_score_is_named():
    a, b, ids, s = batch([OCR, TP, INSTR, TP], seed=18)
    s[3] = float("nan")
    with pytest.raises(ValueError, match=r"text_pair.*index \[3\]"):
        dle_loss(a, b, ids, s, torch.ones(5))


@pytest.mark.parametrize("what", ["shape", "ids_range", "ids_dtype", "scores", "weights", "empty"])
def test_bad_inputs_raise_value_error(what):
    a, b, ids, s = batch([OCR, TP, INSTR], seed=19)
    w = torch.ones(5)
    args = {"shape": (a, b[:2], ids, s, w), "ids_range": (a, b, torch.tensor([0, 5, 1]), s, w),
            "ids_dtype": (a, b, ids.double(), s, w), "scores": (a, b, ids, s[:2], w),
            "weights": (a, b, ids, s, torch.ones(4)), "empty": (a[:0], b[:0], ids[:0], s[:0], w)}[what]
    with pytest.raises(ValueError):
        dle_loss(*args)


def test_triplet_config_must_cover_the_triplet_tasks():
    a, b, ids, s = batch([OCR, TP, INSTR], seed=20)
    cfg = LossConfig(lambda_triplet={"ocr": 1.0, "vqa_single": 1.0})
    with pytest.raises(ValueError, match="lambda_triplet.*vqa_multi"):
        dle_loss(a, b, ids, s, torch.ones(5), cfg)
    cfg = LossConfig(triplet_margin={"ocr": 0.2, "vqa_single": 0.2, "vqa_multi": 0.3, "instr": 0.1})
    with pytest.raises(ValueError, match="triplet_margin.*instr"):
        dle_loss(a, b, ids, s, torch.ones(5), cfg)


def test_triplet_negatives_enum_from_config():
    assert LossConfig(triplet_negatives="mean").triplet_negatives is TripletNegatives.MEAN
