"""Checkpoints hold no pickles: every `.pt` loads with `torch.load(weights_only=True)`, the rest is
JSON or safetensors; a restored RNG draws what the saved one would have; every rank's data
position can be read back (resuming on another number of workers)."""
from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vipoly.config import Config
from vipoly.stw import TaskWeighter
from vipoly.tasks import TASKS
from vipoly.train.state import (load_all_data_positions, load_rank_state, load_run_state, save_rank_state,
                                save_run_state, seed_everything, set_rng_state)

POSITION = {"epoch": 1, "step": 7, "sources": {"instr": {"consumed": [3, 5], "held": []}}, "note": "ok"}


def is_pickle(path: Path) -> bool:
    """A raw pickle (protocol ≥ 2 starts with 0x80), or a zip with a pickle inside other than the
    one `torch.save` writes (which `weights_only=True` reads safely)."""
    data = path.read_bytes()
    if data[:1] == b"\x80":
        return True
    if path.suffix != ".pt" and zipfile.is_zipfile(path):
        return any(n.endswith(".pkl") for n in zipfile.ZipFile(path).namelist())
    return False


def config(model_dir: Path) -> Config:
    return Config.model_validate({"model": {"backbone": str(model_dir)}, "train": {"grad_accum": 1, "optimizer": {"warmup_steps": 2}}})


def draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """A checkpoint directory as `loop._checkpoint` writes it, after one optimizer step."""
    from vipoly.model import PolyEmbedder
    from vipoly.train.engine import build_engine

    cfg = config(tiny_model_dir)
    model = PolyEmbedder.build(cfg.model)
    initial_proj = {n: p.detach().float().clone() for n, p in model.named_parameters() if n.startswith("projection.")}
    engine = build_engine(model, cfg, 10, torch.device("cpu"))
    for p in engine.module.parameters():
        p.grad = torch.full_like(p, 1e-3)
    engine.step()  # the optimizer now holds its moments, the scheduler a step count
    weighter = TaskWeighter(cfg.stw)
    weighter.update({t: 1.0 + i for i, t in enumerate(TASKS)}, 0)
    weighter.observe({"ocr": 2.0, "instr": 1.0})  # an open window
    extra = {"bad_in_row": 0, "bad_total": 1, "seen": [3.0, 1.0, 0.0, 2.0, 4.0], "wandb_id": "abc123"}

    d = tmp_path_factory.mktemp("ckpt")
    engine.save(d, 0)
    save_rank_state(d, 0, POSITION)
    save_run_state(d, 5, 0, weighter.state_dict(), extra, initial_proj)
    return d


def test_every_checkpoint_file_loads_without_unpickling(checkpoint):
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    assert {"state.pt", "optimizer.pt", "rank-0.json"} <= {p.name for p in files}
    assert any(p.parent.name == "model" for p in files)
    for path in files:
        assert not is_pickle(path), path
        if path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(str(path))


def test_checkpoint_restores_the_engine_and_run_state(checkpoint, tiny_model_dir):
    from vipoly.model import PolyEmbedder
    from vipoly.train.engine import build_engine

    cfg = config(tiny_model_dir)
    engine = build_engine(PolyEmbedder.build(cfg.model), cfg, 10, torch.device("cpu"))
    engine.load(checkpoint)
    assert engine.scheduler.last_epoch == 1 and engine.optimizer.state  # the step taken before saving

    state = load_run_state(checkpoint)
    assert state["step"] == 5 and state["extra"]["wandb_id"] == "abc123"
    assert set(state["initial_proj"]) and all(isinstance(v, torch.Tensor) for v in state["initial_proj"].values())
    weighter = TaskWeighter(cfg.stw)
    weighter.load_state_dict(state["stw"])
    assert weighter.window_losses() == {"instr": 1.0, "ocr": 2.0}


def test_rng_state_restores_exactly(tmp_path):
    seed_everything(123)
    random.gauss(0, 1), np.random.randn()  # leave cached Gaussians in both generators
    save_rank_state(tmp_path, 3, POSITION)
    want = draws()
    seed_everything(999)
    state = load_rank_state(tmp_path, 3)
    assert state["data"] == POSITION
    set_rng_state(state["rng"])
    assert draws() == want


def test_all_data_positions_in_rank_order(tmp_path):
    for rank in (10, 2, 0):
        save_rank_state(tmp_path, rank, {"rank": rank})
    (tmp_path / "rank-x.json").write_text("{}")  # not a rank file
    assert load_all_data_positions(tmp_path) == [{"rank": 0}, {"rank": 2}, {"rank": 10}]
    assert load_rank_state(tmp_path, 1) is None


def test_a_position_that_is_not_json_fails_at_save(tmp_path):
    with pytest.raises(TypeError):
        save_rank_state(tmp_path, 0, {"step": np.int64(3)})
