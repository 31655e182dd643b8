"""The README's Python example runs (against the tiny model instead of the demo's trained one)."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tiny_model_dir, tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "bill.png")
    code = blocks[0].replace("runs/demo/model", str(tiny_model_dir)).replace("runs/demo/bill.png",
                                                                            str(tmp_path / "bill.png"))
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert -1.0 <= float(capsys.readouterr().out.strip()) <= 1.0
    assert scope["small"].shape == (1, 32)
    assert scope["pair"].shape[0] == 1
