"""Canonical schema round trip, per-row validation rules, duplicate detection."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vipoly.data.schema import COLUMNS, ORDER, SCHEMA, SOURCE, conform, make_row, rows_to_table
from vipoly.data.validate import check_row, duplicate_losers, image_error


def png_bytes(size=(20, 12), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def good(**kw):
    base = dict(id="r1", task="instr", lang="vi", query_text="Tìm câu về bác sĩ", pos_text="Bác sĩ đọc sách.")
    base.update(kw)
    return make_row(**base)


def test_schema_round_trip(tmp_path):
    img = png_bytes()
    rows = [
        good(id="a", neg_text=["Một câu khác."]),
        make_row(id="b", task="ocr", lang="zh", query_images=[img], pos_text="老师看书。"),
        make_row(id="c", task="text_pair", lang="en", query_text="x", pos_text="y", score=0.25),
    ]
    table = rows_to_table(rows)
    assert table.schema == SCHEMA
    pq.write_table(table, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert [r["id"] for r in back] == ["a", "b", "c"]
    assert back[1]["query_images"] == [img] and back[1]["query_text"] is None
    assert back[0]["neg_text"] == ["Một câu khác."] and back[0]["pos_images"] == []
    assert back[2]["score"] == pytest.approx(0.25) and back[0]["score"] is None
    assert list(back[0]) == list(COLUMNS)


def test_conform_fills_and_names_bad_columns():
    t = pa.table({"id": ["x"], "task": ["instr"], "lang": ["en"], "query_text": ["q"], "pos_text": ["p"],
                  "extra": [1]})
    c = conform(t)
    assert c.schema == SCHEMA and c.column("query_images").to_pylist() == [[]]
    with pytest.raises(ValueError, match="'id'"):
        conform(pa.table({"task": ["instr"]}))
    with pytest.raises(ValueError, match="'score'"):
        conform(pa.table({"id": ["x"], "task": ["t"], "lang": ["en"], "score": [[1.0]]}))
    with pytest.raises(ValueError, match="unknown canonical field"):
        make_row(id="x", qurey_text="typo")


def test_good_row_is_cleaned():
    decomposed = "Tie\u0302\u0301ng Vie\u0323\u0302t"  # "Tiếng Việt" with combining marks
    row, reason = check_row(good(query_text=decomposed, pos_text="  ", pos_images=[png_bytes()], neg_text=["", "n"]))
    assert reason is None
    assert row["query_text"] == "Tiếng Việt"  # NFC
    assert row["pos_text"] is None and row["neg_text"] == ["n"]


@pytest.mark.parametrize("row, kind", [
    (good(id=""), "missing id"),
    (good(id=None), "missing id"),
    (good(task="captioning"), "unknown task"),
    (good(lang="fr"), "unknown lang"),
    (good(query_text=None), "no query"),
    (good(query_text="   "), "no query"),
    (good(pos_text=None), "no positive"),
    (good(task="text_pair"), "text_pair without a score"),
    (good(task="text_pair", score=float("nan")), "text_pair without a score"),
    (good(task="text_pair", score=1.5), "bad score"),
    (good(task="text_pair", score=-0.1), "bad score"),
    (good(score=float("inf")), "bad score"),
    (good(score="high"), "bad score"),
    (good(query_images=[b"\x89PNG\r\n\x1a\nnot really"]), "image does not decode"),
    (good(pos_images=[png_bytes()[:-30]]), "image does not decode"),  # truncated stream
    (good(query_text=123), "not a string"),
])
def test_each_bad_row_has_its_reason(row, kind):
    _, reason = check_row(row)
    assert reason is not None and reason.split(":")[0] == kind, reason


def test_overlong_text_truncated_or_rejected():
    long = "a" * 50
    row, reason = check_row(good(pos_text=long), max_text_chars=20, overlong="truncate")
    assert reason is None and row["pos_text"] == "a" * 20
    _, reason = check_row(good(pos_text=long), max_text_chars=20, overlong="reject")
    assert reason.startswith("overlong text: pos_text has 50 characters")
    _, reason = check_row(good(neg_text=["ok", long]), max_text_chars=20, overlong="reject")
    assert "neg_text[1]" in reason


def test_score_optional_outside_text_pair_and_nan_is_none():
    row, reason = check_row(good(score=float("nan")))
    assert reason is None and row["score"] is None
    row, reason = check_row(good(task="text_pair", score=0))
    assert reason is None and row["score"] == 0.0


def test_image_error():
    assert image_error(png_bytes()) is None
    assert "not image bytes" in image_error(b"")
    assert image_error(b"GIF89a garbage") is not None


def test_duplicate_losers_keep_first_by_order():
    ids = pa.table({"id": ["x", "y", "x", "z", "x", "y"], ORDER: [5, 1, 2, 9, 7, 0],
                    SOURCE: ["f:5", "f:1", "f:2", "f:9", "f:7", "f:0"]})
    losers = duplicate_losers(ids).to_pylist()
    got = {(r[ORDER], r["id"]) for r in losers}
    assert got == {(5, "x"), (7, "x"), (1, "y")}  # x first at order 2, y first at order 0
    by_order = {r[ORDER]: r["_reason"] for r in losers}
    assert by_order[5] == "duplicate id: 'x' (first at f:2)"
    assert by_order[1] == "duplicate id: 'y' (first at f:0)"
    assert duplicate_losers(ids.slice(0, 0)).num_rows == 0
