"""The Ray Data embedding job: row accounting, resume, equality with `encode`, and bad input.

Inputs are real NTREX sentences (Vietnamese and English) plus small generated images, in one Parquet
file (image bytes) and one JSONL file (image paths), with bad rows mixed in.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import embed
from pipelines.embed import build_parser, run
from vipoly.embed import inputs as job_inputs, output

N_PARQUET, N_JSONL = 40, 16


def _png(color, size=(40, 28)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, eval_data):
    """Two input files and what the job should make of them: {id: (text, image)} and bad ids."""
    root = tmp_path_factory.mktemp("embed_in")
    vi = (eval_data / "ntrex128" / "newstest2019-ref.vie.txt").read_text(encoding="utf-8").split("\n")
    en = (eval_data / "ntrex128" / "newstest2019-src.eng.txt").read_text(encoding="utf-8").split("\n")
    good: dict[str, tuple[str | None, object]] = {}
    rows = []
    for i in range(N_PARQUET):
        text = None if i % 7 == 3 else vi[i]  # some rows are image-only
        image = _png((6 * i, 90, 250 - 5 * i)) if i % 3 == 0 or text is None else None
        rows.append({"id": f"p{i}", "text": text, "image": image})
        good[f"p{i}"] = (text, image)
    rows += [{"id": "bad-image", "text": "có chữ", "image": b"\x89PNG broken"},
             {"id": "blank", "text": "   ", "image": None},
             {"id": None, "text": "no id", "image": None},
             {"id": "p5", "text": "a second row with id p5", "image": None}]
    pq.write_table(pa.Table.from_pylist(rows), root / "a.parquet", row_group_size=8)
    Image.new("RGB", (48, 48), (0, 200, 0)).save(root / "green.png")
    with open(root / "b.jsonl", "w", encoding="utf-8") as f:
        for i in range(N_JSONL):
            image = "green.png" if i % 4 == 0 else None  # relative: resolved beside the input file
            rid = f"{i:03d}"  # digits only: must stay "007", not become 7
            f.write(json.dumps({"id": rid, "text": en[i], "image": image}, ensure_ascii=False) + "\n")
            good[rid] = (en[i], str(root / "green.png") if image else None)
        f.write(json.dumps({"id": "lost-file", "text": "x", "image": "missing.png"}) + "\n")
        f.write('{"id": "cut-off", "text": "half a li\n')
    return {"files": [str(root / "a.parquet"), str(root / "b.jsonl")], "good": good,
            "n_rows": len(rows) + N_JSONL + 2,
            "bad": [("bad-image", "undecodable image"), ("blank", "empty text and no image"), (None, "missing id"),
                    ("lost-file", "image file not found"), ("p5", "duplicate id"),
                    (None, "not a JSON object")]}  # a cut-off line has no readable id


def _args(model_dir, inputs, out, *extra):
    return build_parser().parse_args(["--model", str(model_dir), "--input", *inputs["files"], "--output", str(out),
                                      "--batch-size", "8", "--num-actors", "1", "--cpus-per-actor", "1", *extra])


def _read(out: Path):
    table = pq.read_table(out)  # the folder reads as one dataset: bookkeeping files start with "_"
    ids = table.column("id").to_pylist()
    emb = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32).reshape(len(ids), -1)
    return table, ids, emb


def _errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / output.ERRORS).read_text().splitlines()]


def _digest(files) -> dict[str, str]:
    return {f.name: hashlib.sha1(f.read_bytes()).hexdigest() for f in files}


def test_embed_job_accounting_equality_and_rerun(ray_session, tiny_model_dir, tiny_model, inputs, tmp_path):
    out = tmp_path / "emb"
    summary = run(_args(tiny_model_dir, inputs, out))

    # accounting: every input row is either embedded once or reported once
    table, ids, emb = _read(out)
    errors = _errors(out)
    assert len(ids) == len(set(ids)) == len(inputs["good"])
    assert set(ids) == set(inputs["good"])
    assert len(ids) + len(errors) == inputs["n_rows"] == summary["rows_in"]
    assert summary["embedded"] == len(ids) and summary["errors"] == len(errors)
    assert len(errors) == len(inputs["bad"])
    for rid, expected in inputs["bad"]:
        assert any(e["id"] == rid and expected in e["reason"] for e in errors), (rid, expected, errors)
    assert next(e for e in errors if e["id"] == "bad-image")["file"].endswith("a.parquet")

    # schema and values: fixed-size float32 lists equal to PolyEmbedder.encode
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), tiny_model.embedding_dim)
    assert set(table.column("dim").to_pylist()) == {tiny_model.embedding_dim}
    assert set(table.column("model").to_pylist()) == {tiny_model.name}
    for rid, vec in zip(ids, emb):
        text, image = inputs["good"][rid]
        ref = tiny_model.encode(texts=[text] if text else None, images=[image] if image is not None else None)[0]
        np.testing.assert_allclose(vec, ref, atol=1e-4, err_msg=rid)

    # a finished job re-run: nothing new, output unchanged, no duplicates
    before = _digest(output.output_files(out))
    summary = run(_args(tiny_model_dir, inputs, out))
    assert summary["embedded"] == 0 and summary["skipped"] == len(ids) + 1  # + the second copy of p5
    assert summary["rows_in"] == inputs["n_rows"]
    assert _digest(output.output_files(out)) == before
    _, ids2, _ = _read(out)
    assert sorted(ids2) == sorted(ids)


def test_resume_after_a_killed_run(tmp_path):
    """What a re-run starts from: the ids of complete parts; a half-written part is set aside so its
    rows are embedded again; ids already done are dropped before any decoding."""
    out = tmp_path / "emb"
    out.mkdir()
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6, np.float32)), 2)
    pq.write_table(pa.table({"id": ["a", "b", "c"], "embedding": emb}), out / "part-1.parquet")
    (out / "part-2.parquet").write_bytes(b"PAR1 cut short by a kill")
    (out / "_errors.jsonl").write_text("")
    done = output.existing_ids(out)
    assert sorted(done.to_pylist()) == ["a", "b", "c"]
    assert (out / output.SET_ASIDE / "part-2.parquet").exists() and not (out / "part-2.parquet").exists()

    batch = pa.table({"id": ["a", "x", "c", "y"], "text": ["t"] * 4, "path": ["in.parquet"] * 4})
    kept = job_inputs.normalize(batch, job_inputs.Columns("id", "text", None), done, str(out / output.SIDE_DIR))
    assert kept.column("id").to_pylist() == ["x", "y"]
    stats = output.merge_side_files(out / output.SIDE_DIR)
    assert (stats["rows_in"], stats["skipped"]) == (4, 2)


def test_duplicate_ids_are_embedded_once(tmp_path):
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(8, dtype=np.float32)), 2)
    first, second = tmp_path / "p0.parquet", tmp_path / "p1.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "embedding": emb[:2]}), first)
    pq.write_table(pa.table({"id": ["b", "c"], "embedding": emb[2:]}), second)
    assert output.drop_duplicates([first, second]) == ["b"]
    assert pq.read_table(first).column("id").to_pylist() == ["a", "b"]  # the first copy stays
    assert pq.read_table(second).column("id").to_pylist() == ["c"]
    assert output.drop_duplicates([first, second]) == []


def test_bad_input_fails_before_work(tiny_model_dir, inputs, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"--input .*nope\.parquet: file not found"):
        run(build_parser().parse_args(["--model", str(tiny_model_dir), "--input", str(tmp_path / "nope.parquet"),
                                       "--output", str(out)]))
    with pytest.raises(ValueError, match=r"a\.parquet: column 'caption' \(--text-col\) not found"):
        run(_args(tiny_model_dir, inputs, out, "--text-col", "caption"))
    with pytest.raises(ValueError, match=r"a\.parquet: id column 'doc_id' not found"):
        run(_args(tiny_model_dir, inputs, out, "--id-col", "doc_id"))
    with pytest.raises(ValueError, match=r"b\.jsonl: column 'pixels' \(--image-col\) not found"):
        run(build_parser().parse_args(["--model", str(tiny_model_dir), "--input", inputs["files"][1],
                                       "--output", str(out), "--image-col", "pixels"]))
    with pytest.raises(ValueError, match="not a saved PolyEmbedder"):
        run(_args(tmp_path, inputs, out))
    with pytest.raises(ValueError, match="--dim 999"):
        run(_args(tiny_model_dir, inputs, out, "--dim", "999"))
    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["t"], "image": [[1, 2]]}), typed)
    with pytest.raises(ValueError, match=r"typed\.parquet: image column 'image' has type list<"):
        run(build_parser().parse_args(["--model", str(tiny_model_dir), "--input", str(typed), "--output", str(out)]))
    assert not out.exists()  # nothing was started


def test_resource_check_prevents_a_hang():
    """On 2 CPUs an actor of 1 CPU + a preparer would leave Ray Data's 1-CPU file listing unscheduled."""
    args = build_parser().parse_args(["--model", "m", "--input", "x", "--output", "o", "--cpus-per-actor", "1"])
    with pytest.raises(ValueError, match=r"--cpus-per-actor 1.0 .* = 2.25 CPUs, the cluster has 2"):
        embed.check_resources(args, {"CPU": 2.0}, strict=True)
    embed.check_resources(args, {"CPU": 2.0}, strict=False)  # a cluster that may grow: a warning only
    ok = build_parser().parse_args(["--model", "m", "--input", "x", "--output", "o"])
    embed.check_resources(ok, {"CPU": 2.0}, strict=True)  # the defaults fit a 2-core machine
    gpu = build_parser().parse_args(["--model", "m", "--input", "x", "--output", "o", "--num-gpus-per-actor", "1"])
    with pytest.raises(ValueError, match="GPUs, the cluster has 0"):
        embed.check_resources(gpu, {"CPU": 16.0}, strict=True)
