"""pipelines.prepare end to end on Ray Data: every bad row in the quarantine with its reason, every
good row in a shard, the manifest's counts, the CLI."""
from __future__ import annotations

import base64
import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import prepare as cli
from vipoly.data.config import DataConfig
from vipoly.data.converters import ConvertOptions
from vipoly.data.prepare import prepare


def png_b64(colour=(0, 128, 0)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def shard_rows(out):
    rows = []
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        rows += pq.read_table(d).to_pylist()
    return rows


GOOD = [
    {"id": "g1", "task": "instr", "lang": "vi", "query_text": "Tìm câu về bác sĩ", "pos_text": "Bác sĩ đọc sách."},
    {"id": "g2", "task": "text_pair", "lang": "en", "query_text": "a cat", "pos_text": "a kitten", "score": 0.8},
    {"id": "g3", "task": "ocr", "lang": "zh", "query_images": [png_b64()], "pos_text": "老师"},
    {"id": "g4", "task": "vqa_single", "lang": "en", "query_text": "What colour?", "query_images": [png_b64()],
     "pos_text": "Green."},
    {"id": "g5", "task": "vqa_multi", "lang": "vi", "query_text": "Hỏi: a\nĐáp: b\nHỏi: c",
     "query_images": [png_b64()], "pos_text": "d", "neg_text": ["e"]},
    {"id": "g6", "task": "text_pair", "lang": "vi", "query_text": "x" * 30, "pos_text": "y", "score": 0},
]
BAD = [  # (row, reason kind)
    ({"id": "b1", "task": "captions", "lang": "en", "query_text": "q", "pos_text": "p"}, "unknown task"),
    ({"id": "b2", "task": "instr", "lang": "en", "pos_text": "p"}, "no query"),
    ({"id": "b3", "task": "instr", "lang": "en", "query_text": "q"}, "no positive"),
    ({"id": "b4", "task": "text_pair", "lang": "en", "query_text": "q", "pos_text": "p"}, "text_pair without a score"),
    ({"id": "b5", "task": "text_pair", "lang": "en", "query_text": "q", "pos_text": "p", "score": 1.2}, "bad score"),
    ({"id": "b6", "task": "ocr", "lang": "en", "query_images": [base64.b64encode(b"\x89PNG broken").decode()],
      "pos_text": "t"}, "image does not decode"),
    ({"id": "g1", "task": "instr", "lang": "vi", "query_text": "again", "pos_text": "again"}, "duplicate id"),
    ({"id": "b8", "task": "instr", "lang": "en", "query_text": "q" * 30, "pos_text": "p"}, "overlong text"),
    ({"id": "b9", "task": "ocr", "lang": "en", "query_images": ["nope.png"], "pos_text": "t"}, "bad image reference"),
]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    d = tmp_path_factory.mktemp("crafted")
    lines = [json.dumps(r, ensure_ascii=False) for r in GOOD[:3]]
    lines += [json.dumps(r, ensure_ascii=False) for r, _ in BAD]
    lines += [json.dumps(r, ensure_ascii=False) for r in GOOD[3:]] + ["{not json"]
    (d / "in.jsonl").write_text("\n".join(lines) + "\n")
    return d / "in.jsonl"


def test_every_bad_row_quarantined_every_good_row_sharded(ray_session, crafted, tmp_path):
    out = tmp_path / "out"
    bad = BAD[:7] + BAD[8:]  # with overlong = truncate, b8 (and g6) are cut to 25 characters and kept
    m = prepare("canonical", [str(crafted)], out, ConvertOptions(), DataConfig(max_text_chars=25, overlong="truncate"),
                rows_per_file=2)
    rows = shard_rows(out)
    assert sorted(r["id"] for r in rows) == sorted([r["id"] for r in GOOD] + ["b8"])  # b8 truncated, kept
    assert next(r for r in rows if r["id"] == "g6")["query_text"] == "x" * 25
    assert next(r for r in rows if r["id"] == "g1")["query_text"] == "Tìm câu về bác sĩ"  # the first g1 won
    q = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"].split(":")[0]) for r in q] == [(r["id"], k) for r, k in bad] + [(None, "bad record")]
    assert q[6]["source"].endswith("in.jsonl:10") and "first at" in q[6]["reason"] and "in.jsonl:1)" in q[6]["reason"]
    assert m["good"] == len(GOOD) + 1 and m["quarantined"] == len(bad) + 1
    assert m["rows"] == {"text_pair": 2, "instr": 2, "ocr": 1, "vqa_single": 1, "vqa_multi": 1}
    assert m["rows_by_lang"]["text_pair"] == {"en": 1, "vi": 1}
    assert sum(f["rows"] for f in m["files"]) == m["total_rows"] == m["good"]
    assert all(f["rows"] <= 2 for f in m["files"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reasons"]["duplicate id"] == 1 and manifest["bytes"]["ocr"] > 0
    assert not (out / "_staging").exists()

    # overlong = reject: b8 and g6 move to the quarantine, and a rerun needs --overwrite
    with pytest.raises(ValueError, match="overwrite"):
        prepare("canonical", [str(crafted)], out)
    m2 = prepare("canonical", [str(crafted)], out, data=DataConfig(max_text_chars=25, overlong="reject"),
                 overwrite=True)
    assert m2["reasons"]["overlong text"] == 2 and m2["good"] == len(GOOD) - 1
    assert sorted(r["id"] for r in shard_rows(out)) == sorted(r["id"] for r in GOOD if r["id"] != "g6")


def test_cli_on_real_vnpara(ray_session, eval_data, tmp_path, capsys):
    out = tmp_path / "vnpara"
    m = cli.main(["--format", "pairs", "--input", str(eval_data / "vnpara"), "--out", str(out),
                  "--set", "data.max_text_chars=100000"])
    printed = capsys.readouterr().out
    assert "good 3083, quarantined 0" in printed
    assert m["rows"] == {"text_pair": 3083} and m["rows_by_lang"]["text_pair"] == {"vi": 3083}
    rows = pq.read_table(out / "text_pair").to_pylist()
    assert len({r["id"] for r in rows}) == 3083
    assert next(r for r in rows if r["id"] == "vnpara:62")["score"] == 1.0
    assert [r["id"] for r in rows[:3]] == ["vnpara:1", "vnpara:2", "vnpara:3"]  # input order kept


def test_input_without_a_good_row(ray_session, tmp_path):
    (tmp_path / "bad.jsonl").write_text("{broken\n")
    m = prepare("canonical", [str(tmp_path / "bad.jsonl")], tmp_path / "out")
    assert (m["good"], m["quarantined"], m["rows"]) == (0, 1, {})


def test_cli_errors_are_plain(ray_session, tmp_path):
    with pytest.raises(ValueError, match="input not found"):
        cli.main(["--format", "squad", "--input", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="unknown task"):
        cli.main(["--format", "squad", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--task", "nope"])
