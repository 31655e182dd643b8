"""Strategic Task Weighting: the formula, the modes by epoch, fallbacks, windows, clamp, state."""
from __future__ import annotations

import json

import pytest
import torch

from vipoly.stw.config import STWConfig, STWMode
from vipoly.losses import dle_loss
from vipoly.stw import RULES, TaskWeighter
from vipoly.tasks import TASKS

LOSSES = {"text_pair": 4.2, "instr": 0.9, "ocr": 1.1, "vqa_single": 1.3, "vqa_multi": 1.25}  # SPEC §3 levels


def expected(losses: dict[str, float], cfg: STWConfig, epoch: int) -> dict[str, float]:
    mean = sum(losses.values()) / len(losses)
    beta = cfg.beta_foundation if epoch == 0 else cfg.beta_balance
    return {t: mean / v * cfg.alpha[t] * beta for t, v in losses.items()}


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_dynamic_formula_with_every_task(epoch):
    cfg = STWConfig(mode="dynamic")
    got = TaskWeighter(cfg).update(LOSSES, epoch)
    assert got == pytest.approx(expected(LOSSES, cfg, epoch), rel=1e-15)
    assert list(got) == list(TASKS)
    # the contrastive text pairs (highest loss, α = 0.27) get the least weight
    assert min(got, key=got.get) == "text_pair"


def test_none_is_equal_weights_whatever_the_losses():
    w = TaskWeighter(STWConfig(mode="none"))
    assert w.weights(0) == {t: 1.0 for t in TASKS}
    assert w.update(LOSSES, 3) == {t: 1.0 for t in TASKS}
    assert w.as_tensor(1).tolist() == [1.0] * 5


def test_static_table_by_epoch():
    cfg = STWConfig(mode="static")
    w = TaskWeighter(cfg)
    assert w.weights(0) == cfg.static_epoch0
    assert w.weights(1) == w.weights(7) == cfg.static_later
    assert w.update(LOSSES, 0) == cfg.static_epoch0  # static ignores the losses
    assert w.as_tensor(0).tolist() == pytest.approx([0.25, 1.2, 1.0, 1.0, 0.8])
    assert w.as_tensor(1).tolist() == pytest.approx([0.22, 1.3, 1.2, 1.0, 0.8])


def test_dynamic_starts_from_static_and_keeps_weights_when_too_few_tasks():
    cfg = STWConfig(mode="dynamic", min_tasks=3)
    w = TaskWeighter(cfg)
    assert w.weights(0) == cfg.static_epoch0 and w.weights(1) == cfg.static_later
    assert w.update({"ocr": 1.0, "instr": 2.0}, 0) == cfg.static_epoch0  # 2 < min_tasks
    first = w.update(LOSSES, 0)
    assert w.update({"vqa_multi": 0.5}, 1) == first  # after an update: keep the dynamic weights
    assert w.weights(1) == first  # dynamic weights do not jump back to the table at an epoch change


def test_partial_window_updates_present_tasks_and_keeps_the_rest():
    cfg = STWConfig(mode="dynamic")
    w = TaskWeighter(cfg)
    part = {"text_pair": 4.0, "ocr": 1.0, "vqa_multi": 1.6}
    got = w.update(part, 0)
    want = cfg.static_epoch0 | expected(part, cfg, 0)  # ℓ̄ over the three present tasks only
    assert got == pytest.approx(want, rel=1e-15)
    again = w.update({"instr": 1.0, "ocr": 3.0}, 1)
    assert again == pytest.approx(got | expected({"instr": 1.0, "ocr": 3.0}, cfg, 1), rel=1e-15)


def test_clamp_bounds_dynamic_weights():
    cfg = STWConfig(mode="dynamic", clamp=(0.5, 1.5))
    losses = {"text_pair": 4.0, "instr": 0.4, "ocr": 2.0}  # ℓ̄ = 2.13: raw λ ≈ 0.15, 7.0, 1.12
    got = TaskWeighter(cfg).update(losses, 0)
    raw = expected(losses, cfg, 0)
    assert raw["text_pair"] < 0.5 and raw["instr"] > 1.5  # the case exercises both bounds
    assert got["text_pair"] == 0.5 and got["instr"] == 1.5
    assert got["ocr"] == pytest.approx(raw["ocr"])
    with pytest.raises(ValueError, match="stw.clamp"):
        TaskWeighter(STWConfig(clamp=(2.0, 1.0)))


@pytest.mark.parametrize("mode", list(STWMode))
def test_unknown_task_and_bad_losses_raise(mode):
    w = TaskWeighter(STWConfig(mode=mode))
    with pytest.raises(ValueError, match="'vqa'"):
        w.update({"vqa": 1.0, "ocr": 1.0}, 0)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="ocr"):
            w.update({"ocr": bad, "instr": 1.0}, 0)
    with pytest.raises(ValueError, match="epoch"):
        w.weights(-1)


def test_every_mode_has_a_strategy():
    assert set(RULES) == set(STWMode)


def test_window_is_sample_weighted_and_cleared():
    cfg = STWConfig(mode="dynamic", min_tasks=1)
    w = TaskWeighter(cfg)
    w.observe({"ocr": 1.0, "instr": 2.0}, {"ocr": 3, "instr": 1})
    w.observe({"ocr": 2.0}, {"ocr": 1})
    assert w.window_losses() == pytest.approx({"ocr": (3 * 1.0 + 2.0) / 4, "instr": 2.0})
    got = w.update_from_window(0)
    assert got == pytest.approx(cfg.static_epoch0 | expected({"ocr": 1.25, "instr": 2.0}, cfg, 0))
    assert w.window().sum().item() == 0.0 and w.window_losses() == {}
    with pytest.raises(ValueError, match="vqa"):
        w.observe({"vqa": 1.0})


def test_window_from_dle_stats_and_all_reduce_by_addition():
    """Two workers' windows summed (what all-reduce SUM does) give the update of the pooled batch."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])
    a = torch.nn.functional.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(a + torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1)
    s = torch.rand(8, generator=g, dtype=torch.float64)
    s = torch.where(ids == 0, s, torch.full_like(s, float("nan")))
    cfg = STWConfig(mode="dynamic")
    workers = [TaskWeighter(cfg), TaskWeighter(cfg)]
    pooled = TaskWeighter(cfg)
    for k, rows in enumerate([slice(0, 3), slice(3, 8)]):
        _, stats = dle_loss(a[rows], b[rows], ids[rows], s[rows], torch.ones(5))
        workers[k].observe(stats)
        pooled.observe(stats)
    reduced = workers[0].window() + workers[1].window()
    got = [wk.update_from_window(1, reduced) for wk in workers]
    assert got[0] == got[1] == pooled.update_from_window(1)
    _, full = dle_loss(a[:3], b[:3], ids[:3], s[:3], torch.ones(5))
    local = TaskWeighter(cfg)
    local.observe(full)
    assert local.window_losses() == pytest.approx(full.task_losses())


def test_state_round_trip_through_json():
    cfg = STWConfig(mode="dynamic")
    w = TaskWeighter(cfg)
    w.update(LOSSES, 0)
    w.observe({"ocr": 1.5, "text_pair": 4.0}, {"ocr": 2, "text_pair": 5})
    state = json.loads(json.dumps(w.state_dict()))
    back = TaskWeighter(cfg)
    back.load_state_dict(state)
    assert back.weights(1) == w.weights(1)
    assert torch.equal(back.window(), w.window())
    assert back.update_from_window(1) == w.update_from_window(1)
    with pytest.raises(ValueError, match="mode"):
        TaskWeighter(STWConfig(mode="static")).load_state_dict(state)


def test_due_every_k_steps():
    w = TaskWeighter(STWConfig(update_every=5))
    assert [s for s in range(0, 16) if w.due(s)] == [5, 10, 15]


def test_first_dynamic_update_uses_only_the_steps_since_updates_became_active():
    """The loop's sequence (vipoly.train.loop): observe only while dynamic updates are active, update
    when a window of K steps ends. Exploration-phase losses must not leak into the first update."""
    from vipoly.train.config import TrainConfig
    from vipoly.train.phases import dynamic_stw_active

    tcfg = TrainConfig(phases=(4, 100), dynamic_from_phase="stabilization")
    cfg = STWConfig(mode="dynamic", update_every=3)
    early = {"text_pair": 9.0, "instr": 0.1, "ocr": 3.0, "vqa_single": 0.5, "vqa_multi": 7.0}

    def run(observe_always: bool) -> TaskWeighter:
        w = TaskWeighter(cfg)
        for step in range(6):  # steps 0–3 explore; 4 and 5 are the first active ones; K ends at 6
            losses = LOSSES if dynamic_stw_active(step, tcfg) else early
            if observe_always or dynamic_stw_active(step, tcfg):
                w.observe(losses, {t: 2 for t in TASKS})
            done = step + 1
            if dynamic_stw_active(step, tcfg) and w.due(done) and w.window_losses():
                w.update_from_window(0)
        return w

    assert run(observe_always=False).weights(0) == pytest.approx(expected(LOSSES, cfg, 0), rel=1e-12)
    assert run(observe_always=True).weights(0) != pytest.approx(expected(LOSSES, cfg, 0), rel=1e-3)  # the old leak
