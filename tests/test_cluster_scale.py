"""docs/scale.md is reproducible: its numbers are what bench/scale_estimate.py prints, from the
measured baseline it names."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BASELINE = REPO.parent / "shared" / "bench" / "hf_baseline_h100.json"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_estimate", REPO / "bench" / "scale_estimate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(scale, *argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        scale.main(list(argv))
    return out.getvalue()


def test_docs_scale_md_holds_the_script_output_verbatim(scale):
    doc = (REPO / "docs" / "scale.md").read_text()
    printed = _run(scale)
    assert printed.strip() in doc, "docs/scale.md is stale: rerun `python bench/scale_estimate.py` and paste"


def test_copied_measurements_match_the_baseline_file(scale):
    if not SHARED_BASELINE.is_file():
        pytest.fail(f"no {SHARED_BASELINE}: the shared measurements are missing")
    measured = json.loads(SHARED_BASELINE.read_text())
    for key, value in scale.MEASURED.items():
        if isinstance(value, dict):
            assert {k: measured[key][k] for k in value} == value, key
        else:
            assert measured[key] == value, key
    assert _run(scale, "--baseline", str(SHARED_BASELINE)).splitlines()[1:] == _run(scale).splitlines()[1:]


def test_pair_time_and_sync_follow_the_stated_formulas(scale):
    r_text, r_img = 20000.0, 20.0
    text_pair = scale.Task("t", 1, 40, 0, 60, 0)
    assert scale.pair_seconds(text_pair, r_text, r_img, 64) == pytest.approx(100 / r_text)
    ocr = scale.Task("o", 1, 100, 1, 50, 0)  # image side with 36 text tokens beyond the 64 included
    assert scale.pair_seconds(ocr, r_text, r_img, 64) == pytest.approx(1 / r_img + 36 / r_text + 50 / r_text)
    g = 4e9
    assert scale.sync_seconds(1, g, 0.5) == 0
    assert scale.sync_seconds(8, g, 0.0) == pytest.approx(2 * 7 / 8 * g / scale.BUSBW_INTRA)
    assert scale.sync_seconds(16, g, 0.0) == pytest.approx(2 * 15 / 16 * g / scale.BUSBW_INTER)
