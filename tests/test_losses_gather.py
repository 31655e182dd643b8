"""Two real processes (gloo, CPU) under DistributedDataParallel: the gathered loss and the
DDP-averaged gradients equal the single-process loss and gradients on the combined batch."""
from __future__ import annotations

import copy
import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vipoly.losses.config import LossConfig
from vipoly.losses import dle_loss, global_dle_loss, matryoshka_dle_loss, reduce_stats
from vipoly.losses import gather as gather_mod

WORLD = 2
# (name, local batch sizes per rank, loss config, matryoshka dims, use the pre-2.13 all_gather)
CASES = [
    ("dle_unequal_shares", [5, 3], {}, None, False),
    ("dle_mean_negatives", [4, 4], {"triplet_negatives": "mean", "temperature": 0.2}, None, False),
    ("matryoshka", [3, 4], {}, [6, 3], False),
    ("infonce_ablation", [4, 4], {"kind": "infonce"}, None, False),
    ("legacy_all_gather", [4, 3], {}, None, True),
]


class Tower(torch.nn.Module):
    """A shared linear encoder for both sides; forward takes both so DDP sees one forward per backward."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, dtype=torch.float64)

    def forward(self, x, y):
        return F.normalize(self.proj(x), dim=-1), F.normalize(self.proj(y), dim=-1)


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 7, generator=g, dtype=torch.float64)
    y = x + 0.7 * torch.randn(n, 7, generator=g, dtype=torch.float64)
    ids = torch.arange(n) % 5
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    scores = torch.where(ids == 0, scores, torch.full_like(scores, float("nan")))
    weights = torch.tensor([0.27, 1.25, 1.0, 1.1, 0.8], dtype=torch.float64)
    return x, y, ids, scores, weights


def _worker(rank: int, out_path: str) -> None:
    # Rendezvous through a file, not a TCP port picked beforehand: between picking a free port and
    # binding it, another process of the suite (the other xdist worker's Ray or gloo) once took it.
    dist.init_process_group("gloo", init_method=f"file://{out_path}.store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for seed, (name, sizes, cfg_kw, dims, legacy) in enumerate(CASES):
        cfg = LossConfig(**cfg_kw)
        x, y, ids, scores, weights = _data(sum(sizes), seed)
        torch.manual_seed(seed)
        model = Tower(7, 6)
        reference = copy.deepcopy(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        lo = sum(sizes[:rank])
        rows = slice(lo, lo + sizes[rank])
        saved = gather_mod._gather_fc
        if legacy:
            gather_mod._gather_fc = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            a, b = ddp(x[rows], y[rows])
            loss, stats = global_dle_loss(a, b, ids[rows], scores[rows], weights, cfg, dims=dims)
            loss.backward()  # DDP averages the gradients over the ranks here
        gather_mod._gather_fc = saved
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= WORLD
        stats = reduce_stats(stats)

        ra, rb = reference(x, y)  # one process, the whole batch
        if dims is None:
            ref_loss, ref_stats = dle_loss(ra, rb, ids, scores, weights, cfg)
        else:
            ref_loss, ref_stats = matryoshka_dle_loss(ra, rb, ids, scores, weights, cfg, dims=dims)
        ref_loss.backward()
        grad_err = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
        grad_size = max(q.grad.abs().max().item() for q in reference.parameters())
        results[name] = {"loss": mean_loss.item(), "ref_loss": ref_loss.item(), "grad_err": grad_err,
                         "grad_size": grad_size,
                         "stats_err": (stats.to_tensor() - ref_stats.to_tensor()).abs().max().item()}
    torch.save(results, f"{out_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_gathered_loss_and_ddp_gradients_equal_single_process(tmp_path):
    out = tmp_path / "result"
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(f"{out}.{rank}")
        assert set(results) == {c[0] for c in CASES}
        for name, r in results.items():
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-12), (rank, name)
            assert r["grad_size"] > 1e-3, (rank, name)  # the comparison is not vacuous
            assert r["grad_err"] < 1e-12 * max(1.0, r["grad_size"]), (rank, name, r)
            assert r["stats_err"] < 1e-10, (rank, name, r)


def test_not_distributed_is_identity():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_mod.gather_with_grad(x) is x
    assert gather_mod.batch_sizes(3) == [3]
