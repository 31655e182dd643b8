"""Everything a resumed run needs to continue exactly: step, optimizer, scheduler, STW, data
position and RNG — per rank where it differs between ranks.

Layout of one checkpoint directory (Ray Train merges the workers' directories into one):
  state.pt                 step, epoch, scheduler, STW, monitor state (rank 0)
  optimizer.pt             optimizer state (rank 0; DDP keeps it identical on every rank)
  model/                   PolyEmbedder.save_pretrained (rank 0; DDP)
  deepspeed/               engine.save_checkpoint (every rank; ZeRO shards optimizer and weights)
  rank-<r>.pt              data position and RNG states of rank r
  metrics.jsonl            copy of the run's metrics up to this step (for object-store runs)
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_rank_state(ckpt_dir: Path, rank: int, data_position: dict) -> None:
    torch.save({"data": data_position, "rng": rng_state()}, Path(ckpt_dir) / f"rank-{rank}.pt")


def load_rank_state(ckpt_dir: Path, rank: int) -> dict | None:
    path = Path(ckpt_dir) / f"rank-{rank}.pt"
    return torch.load(path, weights_only=False) if path.exists() else None
