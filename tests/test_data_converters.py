"""Every converter, on the real files in ../shared/data/eval and on small crafted inputs."""
from __future__ import annotations

import base64
import io
import json
from collections import Counter

import pytest
from PIL import Image

from vipoly.data.converters import (ConvertOptions, convert_unit, guess_lang, lang_from_name, parse_label,
                                    plan_units)
from vipoly.data.schema import ORDER, REASON, SOURCE
from vipoly.data.validate import check_row


def convert(fmt, inputs, **opts):
    o = ConvertOptions(**opts)
    return [row for unit in plan_units(fmt, [str(p) for p in inputs], o) for row in convert_unit(unit, o)]


def checked(rows):
    """(good rows, {reason kind: n}) after the converter's own reasons and the validator."""
    good, bad = [], Counter()
    for r in rows:
        reason = r[REASON] or check_row(r)[1]
        if reason:
            bad[reason.split(":")[0]] += 1
        else:
            good.append(r)
    return good, bad


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- real data
def test_squad_xquad_three_languages(eval_data):
    files = [eval_data / "xquad" / f"xquad.{l}.json" for l in ("vi", "zh", "en")]
    rows = convert("squad", files)
    good, bad = checked(rows)
    assert not bad and len(good) == 3 * 1190
    assert Counter(r["lang"] for r in good) == {"vi": 1190, "zh": 1190, "en": 1190}
    assert all(r["task"] == "instr" and r["score"] is None for r in good)
    ids = [r["id"] for r in good]
    assert len(set(ids)) == len(ids)  # XQuAD shares question ids across languages: the lang makes them unique
    first = good[0]
    assert first["id"] == "56beb4343aeaaa14008c925b-vi"
    assert first["query_text"] == "Đội thủ Panthers đã thua bao nhiêu điểm?"
    assert first["pos_text"].startswith("Đội thủ của Panthers chỉ thua 308 điểm")
    assert len({r[ORDER] for r in rows}) == len(rows)


def test_squad_negatives_are_other_paragraphs_of_the_article(eval_data):
    import json

    path = eval_data / "xquad" / "xquad.vi.json"
    good, bad = checked(convert("squad", [path], negatives=2))
    assert not bad and len(good) == 1190
    article = {p["context"] for p in json.loads(path.read_text())["data"][0]["paragraphs"]}
    first = good[0]
    assert len(first["neg_text"]) == 2 and set(first["neg_text"]) <= article - {first["pos_text"]}
    assert all(r["pos_text"] not in r["neg_text"] and len(r["neg_text"]) <= 2 for r in good)
    assert all(not r["neg_text"] for r in checked(convert("squad", [path]))[0])  # off by default


def test_squad_as_text_pair_gets_score_one(eval_data):
    rows = convert("squad", [eval_data / "xquad" / "xquad.zh.json"], task="text_pair", lang="zh")
    good, bad = checked(rows)
    assert not bad and {r["score"] for r in good} == {1.0} and {r["lang"] for r in good} == {"zh"}


def test_parallel_ntrex_three_languages(eval_data):
    d = eval_data / "ntrex128"
    rows = convert("parallel", [d / "newstest2019-ref.vie.txt", d / "newstest2019-src.eng.txt",
                                d / "newstest2019-ref.zho-CN.txt"])
    good, bad = checked(rows)
    assert not bad and len(good) == 3 * 1997  # vi-en, vi-zh, en-zh per line
    pairs = Counter(r["id"].rsplit(":", 1)[1] for r in good)
    assert pairs == {"vi-en": 1997, "vi-zh": 1997, "en-zh": 1997}
    line1 = {r["id"]: r for r in good if r["id"].split(":")[1] == "1"}
    assert line1["newstest2019:1:vi-en"]["pos_text"] == "Welsh AMs worried about 'looking like muppets'"
    assert line1["newstest2019:1:vi-zh"]["pos_text"].startswith("威尔士国民议会议员")
    assert all(r["score"] == 1.0 and r["task"] == "text_pair" for r in good)


def test_parallel_refuses_misaligned_or_same_language(tmp_path, eval_data):
    a, b = tmp_path / "a.en.txt", tmp_path / "b.vi.txt"
    a.write_text("one\ntwo\n")
    b.write_text("một\n")
    with pytest.raises(ValueError, match="differ in length"):
        plan_units("parallel", [str(a), str(b)], ConvertOptions())
    c = tmp_path / "c.en.txt"
    c.write_text("uno\ndos\n")
    with pytest.raises(ValueError, match="must differ"):
        convert("parallel", [a, c])


def test_pairs_vnpara_tolerates_line_62(eval_data):
    rows = convert("pairs", [eval_data / "vnpara"])
    good, bad = checked(rows)
    assert not bad and len(good) == 3083
    assert {r["lang"] for r in good} == {"vi"}
    row62 = next(r for r in good if r["id"] == "vnpara:62")
    assert row62["score"] == 1.0 and row62[SOURCE].endswith("Labels.txt:62")
    labels = (eval_data / "vnpara" / "Labels.txt").read_text().split()
    assert sum(r["score"] for r in good) == sum(1 for l in labels if l.startswith("1"))


def test_pairs_xnli_tsv_graded(eval_data):
    d = eval_data / "xnli_dev"
    rows = convert("pairs", [d / "dev-vi.tsv", d / "dev-zh.tsv", d / "dev-en.tsv"])
    good, bad = checked(rows)
    assert not bad and len(good) == 3 * 2490
    assert Counter(r["lang"] for r in good) == {"vi": 2490, "zh": 2490, "en": 2490}
    assert Counter(r["score"] for r in good if r["lang"] == "vi") == {1.0: 830, 0.5: 830, 0.0: 830}
    assert good[0]["query_text"] == "Và anh ấy nói, Mẹ, con đã về nhà."


def test_pairs_bad_labels_quarantined(tmp_path):
    (tmp_path / "s1.txt").write_text("a\nb\nc\nd\n")
    (tmp_path / "s2.txt").write_text("A\nB\nC\nD\n")
    (tmp_path / "labels.txt").write_text("1\n0;\n1,0\nmaybe\n")
    rows = convert("pairs", [tmp_path / "s1.txt", tmp_path / "s2.txt", tmp_path / "labels.txt"], lang="en")
    assert [r["score"] for r in rows[:2]] == [1.0, 0.0]
    assert [r[REASON].split(":")[0] for r in rows[2:]] == ["bad label", "bad label"]
    assert rows[2][SOURCE].endswith("labels.txt:3")


def test_parse_label():
    assert parse_label("1,") == (1.0, None)
    assert parse_label(" entailment ") == (1.0, None)
    assert parse_label("0.75") == (0.75, None)
    assert parse_label("yes", {"yes": 1})[0] == 1.0
    assert parse_label("1,0")[0] is None and parse_label("")[0] is None


# ---------------------------------------------------------------- canonical
def test_canonical_jsonl_images_base64_and_relative_paths(tmp_path):
    img = png_bytes()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(img)
    lines = [
        {"id": "1", "task": "ocr", "lang": "vi", "query_images": ["imgs/a.png"], "pos_text": "chữ"},
        {"id": "2", "task": "ocr", "lang": "en", "query_images": [base64.b64encode(img).decode()], "pos_text": "t"},
        {"id": "3", "task": "ocr", "query_images": "data:image/png;base64," + base64.b64encode(img).decode(),
         "pos_text": "Bác sĩ đọc sách"},
        {"id": "4", "task": "ocr", "lang": "en", "query_images": ["imgs/missing.png"], "pos_text": "t"},
        {"id": "5", "task": "ocr", "lang": "en", "query_images": ["!!not base64!!"], "pos_text": "t"},
        {"id": 6, "query_text": "q", "pos_text": "p", "neg_text": "n"},
    ]
    text = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n{broken json\n"
    (tmp_path / "data.jsonl").write_text(text)
    rows = convert("canonical", [tmp_path / "data.jsonl"], task="instr")
    by_id = {r["id"]: r for r in rows}
    assert by_id["1"]["query_images"] == [img] and by_id["2"]["query_images"] == [img]
    assert by_id["3"]["query_images"] == [img] and by_id["3"]["lang"] == "vi"  # guessed from the text
    assert by_id["4"][REASON].startswith("bad image reference: query_images: image file not found")
    assert by_id["5"][REASON].startswith("bad image reference")
    assert by_id["6"]["task"] == "instr" and by_id["6"]["neg_text"] == ["n"] and by_id["6"]["lang"] == "en"
    assert rows[-1][REASON].startswith("bad record: line 7") and rows[-1][SOURCE].endswith("data.jsonl:7")
    good, bad = checked(rows)
    assert {r["id"] for r in good} == {"1", "2", "3", "6"}


def test_canonical_parquet_and_folder(tmp_path):
    import pyarrow.parquet as pq

    from vipoly.data.schema import make_row, rows_to_table

    rows = [make_row(id=f"p{i}", task="vqa_single", lang="zh", query_text="图中有几个圆形？",
                     query_images=[png_bytes()], pos_text="图中有两个圆形。") for i in range(3)]
    (tmp_path / "sub").mkdir()
    pq.write_table(rows_to_table(rows), tmp_path / "sub" / "x.parquet")
    out = convert("canonical", [tmp_path])
    good, bad = checked(out)
    assert not bad and [r["id"] for r in good] == ["p0", "p1", "p2"]


def test_hf_save_to_disk_with_image_column(tmp_path):
    import datasets

    img = Image.new("RGB", (16, 16), (250, 0, 0))
    ds = datasets.Dataset.from_dict({"question": ["Hình gì?", "What colour?"], "answer": ["Hình tròn.", "Red."],
                                     "picture": [img, img]}).cast_column("picture", datasets.Image())
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "hf"))
    rows = convert("hf", [tmp_path / "hf"], task="vqa_single", split="train",
                   columns={"query_text": "question", "pos_text": "answer", "query_images": "picture"})
    good, bad = checked(rows)
    assert not bad and len(good) == 2
    assert good[0]["lang"] == "vi" and good[1]["lang"] == "en"
    assert good[0]["id"] == "hf:train:0"
    assert Image.open(io.BytesIO(good[0]["query_images"][0])).size == (16, 16)
    assert len(convert("hf", [tmp_path / "hf"], task="instr",
                       columns={"query_text": "question", "pos_text": "answer"})) == 3
    with pytest.raises(ValueError, match="no split 'dev'"):
        plan_units("hf", [str(tmp_path / "hf")], ConvertOptions(split="dev"))


def test_options_and_inputs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        ConvertOptions(task="captions")
    with pytest.raises(ValueError, match="unknown lang"):
        ConvertOptions(lang="fr")
    with pytest.raises(ValueError, match="input not found"):
        plan_units("squad", [str(tmp_path / "nope.json")], ConvertOptions())
    with pytest.raises(ValueError, match="unknown format"):
        plan_units("csv", [], ConvertOptions())


def test_language_helpers():
    assert lang_from_name("xquad.vi.json") == "vi"
    assert lang_from_name("newstest2019-ref.zho-CN.txt") == "zh"
    assert lang_from_name("newstest2019-src.eng.txt") == "en"
    assert lang_from_name("data.txt") is None
    assert guess_lang("Bác sĩ đọc sách") == "vi"
    assert guess_lang("老师在花园里看书。") == "zh"
    assert guess_lang("The doctor reads") == "en"
    assert guess_lang("Der Arzt liest ein Buch über Ärzte") == "other"
