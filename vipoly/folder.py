"""A saved PolyEmbedder folder's own file, vipoly.json: the one test that a folder is one, light
enough (no torch) for the data workers and the command lines that check their arguments first."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META_FILE = "vipoly.json"  # written by PolyEmbedder.save_pretrained


def is_polyembedder_dir(path: str | Path) -> bool:
    """Whether `path` is a folder with vipoly.json (a saved PolyEmbedder), not a plain Qwen2-VL checkpoint."""
    return (Path(path) / META_FILE).is_file()


def read_meta(model_dir: str | Path, flag: str = "") -> dict[str, Any]:
    """A saved PolyEmbedder's vipoly.json; a ValueError naming the folder (after `flag`, the
    argument it came from) when the folder is not one."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise ValueError(f"{flag + ' ' if flag else ''}{model_dir}: not a saved PolyEmbedder (no {META_FILE})")
    return json.loads(path.read_text())
