"""Everything a resumed run needs to continue exactly: step, optimizer, scheduler, STW, data
position and RNG — per rank where it differs between ranks.

Layout of one checkpoint directory (Ray Train merges the workers' directories into one):
  state.pt                 step, epoch, STW, monitor state, initial projection weights (rank 0)
  optimizer.pt             optimizer and scheduler state (rank 0; DDP keeps it identical on every rank)
  model/                   PolyEmbedder.save_pretrained (rank 0; DDP)
  deepspeed/               engine.save_checkpoint (every rank; ZeRO shards optimizer and weights)
  rank-<r>.json            data position and RNG states of rank r
  metrics.jsonl            copy of the run's metrics up to this step (for object-store runs)

No pickles: a checkpoint may come from object storage or another user, and unpickling runs code.
Every `.pt` here loads with `torch.load(weights_only=True)` (tensors and plain Python values
only), the rest is JSON or safetensors. The RNG states go into JSON as lists of ints, so that
`load_all_data_positions` can read every rank's position with no tensor loading at all.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.pt"


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states as JSON values (ints, floats, lists, None)."""
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, key.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank_file(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / f"rank-{rank}.json"


def save_rank_state(ckpt_dir: Path, rank: int, data_position: dict) -> None:
    """Rank `rank`'s data position (a JSON-able dict: a TypeError names what is not) and RNG states."""
    _rank_file(ckpt_dir, rank).write_text(json.dumps({"data": data_position, "rng": rng_state()}))


def load_rank_state(ckpt_dir: Path, rank: int) -> dict | None:
    """{"data": position, "rng": states} as saved by `save_rank_state`; None if this rank saved none."""
    path = _rank_file(ckpt_dir, rank)
    return json.loads(path.read_text()) if path.exists() else None


def load_all_data_positions(ckpt_dir: Path) -> list[dict]:
    """The data positions of every rank that saved one, in rank order: what a run resumed on a
    different number of workers starts from."""
    ranks = []
    for path in Path(ckpt_dir).glob("rank-*.json"):
        suffix = path.stem[len("rank-"):]
        if suffix.isdigit():
            ranks.append(int(suffix))
    return [load_rank_state(ckpt_dir, r)["data"] for r in sorted(ranks)]


def save_run_state(ckpt_dir: Path, step: int, epoch: int, stw_state: dict, extra: dict,
                   initial_proj: dict[str, torch.Tensor]) -> None:
    """Rank 0's share of a checkpoint: the step, epoch, `TaskWeighter.state_dict()`, the loop's
    counters (`extra`: ints, lists of floats, strings) and the projection weights at the start."""
    torch.save({"step": step, "epoch": epoch, "stw": stw_state, "extra": extra, "initial_proj": initial_proj},
               Path(ckpt_dir) / STATE_FILE)


def load_run_state(ckpt_dir: Path) -> dict:
    return torch.load(Path(ckpt_dir) / STATE_FILE, weights_only=True)
