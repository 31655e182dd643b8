"""What a DDP worker pays to get its model back on resume: building it from `model.backbone` and
then loading the checkpoint's `model/` over it (how a resume worked before), against building it
from the checkpoint's `model/` alone (`vipoly.train.engine.build_model` with `saved_model`, now).

    .venv/bin/python bench/resume_load.py [--text-layers 8] [--vision-depth 8] [--repeat 2]

The model is Qwen2-VL-2B's architecture at its real widths (text 1536 wide with 8960-wide MLPs,
vision 1280 wide) with fewer layers (the 2B has 28 and 32) and the tiny tokenizer's vocabulary,
random weights, float32 on CPU; the checkpoint's model/ is a hard-linked copy of the backbone folder
(the same bytes: both paths read from the page cache). Each path runs in a fresh interpreter, the
two alternating `--repeat` times; each prints its wall time and its peak resident memory above the
interpreter's after imports. Prints the medians and the ratios new / old.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2-VL-2B's widths (its config.json); the depths are arguments.
TEXT = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
VISION = dict(embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def measure(path: str, folder: Path) -> dict:
    """One path in this (fresh) interpreter: seconds and peak GiB above the post-import RSS."""
    import torch

    from vipoly.config import Config
    from vipoly.model import PolyEmbedder
    from vipoly.train.engine import build_model, saved_model

    torch.set_num_threads(1)
    cfg = Config.model_validate({"model": {"backbone": str(folder / "backbone")}})
    ckpt = folder / "checkpoint-0000001"
    base = rss_gib()
    t = time.perf_counter()
    if path == "old":  # what DDPEngine.load did after build_model had built from model.backbone
        model = build_model(cfg, torch.device("cpu"))
        src = PolyEmbedder.from_pretrained(ckpt / "model")
        model.load_state_dict(src.state_dict())
        del src
    else:
        model = build_model(cfg, torch.device("cpu"), saved_model(cfg, ckpt))
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    params = sum(p.numel() for p in model.parameters())
    return {"path": path, "seconds": seconds, "peak_gib": peak - base, "params": params}


def build(folder: Path, text_layers: int, vision_depth: int) -> None:
    from vipoly.model.tiny import build_tiny

    build_tiny(folder / "backbone", seed=0, text=dict(TEXT, num_hidden_layers=text_layers),
               vision=dict(VISION, depth=vision_depth))
    model = folder / "checkpoint-0000001" / "model"
    model.mkdir(parents=True)
    for f in (folder / "backbone").iterdir():
        os.link(f, model / f.name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text-layers", type=int, default=8)
    p.add_argument("--vision-depth", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2, help="runs of each path, alternating")
    p.add_argument("--measure", choices=("old", "new"), help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder)))
        return

    import torch
    import transformers

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory(prefix="resume-load-") as tmp:
        t = time.perf_counter()
        build(Path(tmp), args.text_layers, args.vision_depth)
        size = sum(f.stat().st_size for f in (Path(tmp) / "backbone").iterdir()) / 2**30
        print(f"model: {args.text_layers} text layers, vision depth {args.vision_depth}, "
              f"{size:.2f} GiB on disk (built in {time.perf_counter() - t:.0f} s)")
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for _ in range(args.repeat):
            for path in ("old", "new"):
                out = subprocess.run([sys.executable, __file__, "--measure", path, "--folder", tmp],
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                runs[path].append(r)
                print(f"  {path}: {r['seconds']:6.1f} s, peak {r['peak_gib']:5.2f} GiB above imports "
                      f"({r['params']:,} parameters)", flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_gib")} for k, v in runs.items()}
    print(f"build from model.backbone, then load the checkpoint over it: {med['old']['seconds']:.1f} s, "
          f"{med['old']['peak_gib']:.2f} GiB")
    print(f"build from the checkpoint's model/ alone (now):             {med['new']['seconds']:.1f} s, "
          f"{med['new']['peak_gib']:.2f} GiB")
    print(f"ratio new / old: time {med['new']['seconds'] / med['old']['seconds']:.2f}, "
          f"peak memory {med['new']['peak_gib'] / med['old']['peak_gib']:.2f}")


if __name__ == "__main__":
    main()
