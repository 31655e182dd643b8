"""The Ray Data side of the mix: per-source pipelines with encoding stages, per-worker shards,
collation into model batches, and a resume through real Ray sources."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from vipoly.config import DataConfig
from vipoly.data import synthetic
from vipoly.data.collate import PairCollate, RayPairCollateFn, collate_pairs, load_builder
from vipoly.data.encode import SIDES, encode_table, encoded_files, row_handles, table_rows
from vipoly.data.mix import measure_ratio
from vipoly.data.shards import task_sources
from vipoly.data.stream import build_stream, RaySource, resolve_sources, worker_rows
from vipoly.tasks import TASKS


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_stream")
    synthetic.write_synthetic(out, n=100, seed=1, rows_per_file=8)
    return out


def test_resolve_sources(prepared, tmp_path):
    data = DataConfig(root=str(prepared), sources={"extra": str(prepared / "ocr")},
                      mix={"text_pair": 1, "extra": 1})
    files = resolve_sources(data)
    assert set(files) == {"text_pair", "extra"} and files["extra"] == task_sources(prepared)["ocr"]
    with pytest.raises(ValueError, match="'nope'"):
        resolve_sources(DataConfig(root=str(prepared), mix={"nope": 1}))
    with pytest.raises(ValueError, match="no Parquet files"):
        resolve_sources(DataConfig(sources={"x": str(tmp_path)}, mix={"x": 1}))


def test_worker_shards_are_disjoint_and_complete(ray_session, prepared):
    files = task_sources(prepared)["instr"]
    world = 3
    shards = [[r["id"] for r in RaySource(files, rank=r, world=world)(0)] for r in range(world)]
    all_ids = [r["id"] for r in RaySource(files)(0)]
    assert sorted(sum(shards, [])) == sorted(all_ids) and len(all_ids) == 20
    assert all(shards) and len(set(sum(shards, []))) == 20
    assert [len(s) for s in shards] == [worker_rows(files, r, world) for r in range(world)]
    assert [r["id"] for r in RaySource(files, rank=1, world=world)(0)] == shards[1]  # replayable


def test_stream_batches_from_RaySources(ray_session, prepared, tiny_model_dir):
    data = DataConfig(root=str(prepared), mix={"text_pair": 2, "ocr": 1, "vqa_multi": 1}, shuffle_buffer=8)
    collate = PairCollate(tiny_model_dir)
    with build_stream(data, tiny_model_dir, seed=0) as stream:
        batches = stream.iter_batches(8, collate)
        first = next(batches)
        more = [next(batches) for _ in range(4)]
        state = stream.state()
    q, p = first["query"], first["pos"]
    assert q["input_ids"].shape[0] == p["input_ids"].shape[0] == 8
    assert q["attention_mask"].dtype == torch.long and q["input_ids"].dtype == torch.long
    tasks = [TASKS[i] for i in first["task_ids"].tolist()]
    assert first["task_ids"].dtype == torch.long and set(tasks) <= {"text_pair", "ocr", "vqa_multi"}
    for t, s in zip(tasks, first["scores"].tolist()):
        assert (t == "text_pair") == (not math.isnan(s))
    n_images = sum(t in ("ocr", "vqa_multi") for t in tasks)
    assert q["image_grid_thw"].shape == (n_images, 3)  # one image per ocr / vqa query, none for text pairs
    assert "pixel_values" not in p  # positives are texts here
    assert set(first["lang"]) <= {"vi", "en", "zh"} and len(first["id"]) == 8
    assert state["per_task"] == {"text_pair": 20, "ocr": 10, "vqa_multi": 10}
    ids = [i for b in [first, *more] for i in b["id"]]
    picks = [i.split("-")[2] for i in ids]
    assert measure_ratio(picks, data.mix, 8)["max_window_dev"]["max"] < 2


def test_resume_through_RaySources(ray_session, prepared):
    data = DataConfig(root=str(prepared), mix={"instr": 1, "vqa_single": 3}, shuffle_buffer=4)
    with build_stream(data, seed=2) as full:
        expected = [full.next()["id"] for _ in range(70)]  # vqa_single (20 rows) wraps twice
    with build_stream(data, seed=2) as head:
        got = [head.next()["id"] for _ in range(33)]
        saved = head.state()
    with build_stream(data, seed=2, position=saved) as tail:
        got += [tail.next()["id"] for _ in range(37)]
    assert got == expected
    assert saved["epoch"]["vqa_single"] == 1


def test_RaySource_selects_rows_for_a_resume(ray_session, prepared):
    """`RaySource.select` (what a resume reads): the rows at the chosen indices of a pass, then
    every row from `start`; files wholly before `start` holding none of them are not read."""
    files = task_sources(prepared)["vqa_single"]  # 20 rows in 8-row files
    for world, rank in ((1, 0), (2, 1)):
        source = RaySource(files, rank=rank, world=world, seed=5)
        ids = [r["id"] for r in source(3)]
        n = source.num_rows
        assert n == len(ids) == worker_rows(files, rank, world)
        for head, start in (([], 0), ([0, 2], 5), ([1], n - 1), ([0, n - 3], n - 1), ([], n)):
            got = [r["id"] for r in source.select(3, head, start)]
            assert got == [ids[k] for k in head] + ids[start:], (world, head, start)


def test_encoded_rows_equal_encode_one(tiny_model_dir, prepared):
    """The Ray Data stage (batched Rust tokenizer for text sides, the image processor for image
    sides, Arrow list columns) gives every row exactly what InputBuilder.encode_one gives it."""
    import pyarrow.parquet as pq

    builder = load_builder(str(tiny_model_dir))
    checked = 0
    for task in TASKS:
        table = pq.read_table(prepared / task)
        enc = encode_table(table.slice(1), str(tiny_model_dir))
        rows = table_rows(enc.slice(2))  # slices: list offsets that do not start at 0
        for row, src in zip(rows, table.slice(3).to_pylist(), strict=True):
            assert row["id"] == src["id"] and row["task"] == task
            assert (row["score"] is None) == (src["score"] is None)
            for side, (text_key, image_key) in SIDES.items():
                want = builder.encode_one(src[text_key], list(src[image_key] or []) or None, task)
                assert (f"{side}_pixel_values" in row) == ("pixel_values" in want)
                for k, v in want.items():
                    got = row[f"{side}_{k}"]
                    assert got.shape == v.shape and (got == v).all(), (task, side, k)
                checked += 1
    assert checked == 2 * (100 - 3 * len(TASKS))


def test_text_encoding_needs_no_torch(tiny_model_dir, prepared):
    """A Ray worker that only encodes text imports neither torch nor transformers."""
    import subprocess
    import sys

    code = ("import sys, pyarrow.parquet as pq; from vipoly.data.encode import encode_table, table_rows; "
            f"t = encode_table(pq.read_table({str(prepared / 'instr')!r}), {str(tiny_model_dir)!r}); "
            "assert len(table_rows(t)) == t.num_rows; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_ray_collate_equals_row_collate(tiny_model_dir, prepared):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(prepared / "vqa_single").slice(0, 3), pq.read_table(prepared / "instr").slice(0, 2)])
    enc = encode_table(table, str(tiny_model_dir))
    via_ray = RayPairCollateFn(tiny_model_dir)(enc)
    via_rows = collate_pairs(table_rows(enc), load_builder(str(tiny_model_dir)))
    assert_same_batch(via_ray, via_rows)
    assert via_ray["task_ids"].tolist() == [3, 3, 3, 1, 1]
    assert torch.isnan(via_ray["scores"]).all()
    assert via_ray["query"]["image_grid_thw"].shape == (3, 3) and "pixel_values" not in via_ray["pos"]


def test_block_rows_collate_as_dicts(tiny_model_dir, prepared):
    """The stream's row handles, drawn from several blocks in an interleaved order (as the mixer
    hands them out), collate to exactly the batch their dicts give; a handle reads as its dict."""
    import pyarrow.parquet as pq

    builder = load_builder(str(tiny_model_dir))
    blocks = [encode_table(pq.read_table(prepared / task).slice(1, 6), str(tiny_model_dir))
              for task in ("text_pair", "ocr", "vqa_multi")]
    handles = [row_handles(b.slice(1)) for b in blocks]  # sliced: offsets that do not start at 0
    dicts = [table_rows(b.slice(1)) for b in blocks]
    order = [(b, i) for i in range(5) for b in (2, 0, 1)][::-1]
    batch_h = [handles[b][i] for b, i in order]
    batch_d = [dicts[b][i] for b, i in order]
    assert_same_batch(collate_pairs(batch_h, builder), collate_pairs(batch_d, builder))
    assert collate_pairs(batch_h, builder)["query"]["image_grid_thw"].shape[0] == 10
    row = batch_h[0]
    assert row.keys() == batch_d[0].keys() and row.get("task") == "ocr" and row.get("missing", 7) == 7
    assert all(np.array_equal(row[k], v) if isinstance(v, np.ndarray) else row[k] == v for k, v in batch_d[0].items())


def assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for side in ("query", "pos"):
        assert a[side].keys() == b[side].keys()
        for k in a[side]:
            assert a[side][k].dtype == b[side][k].dtype and torch.equal(a[side][k], b[side][k]), (side, k)
    assert torch.equal(a["task_ids"], b["task_ids"]) and torch.equal(a["scores"].isnan(), b["scores"].isnan())
    assert torch.equal(a["scores"].nan_to_num(-1), b["scores"].nan_to_num(-1))
    assert a["lang"] == b["lang"] and a["id"] == b["id"]


def test_pre_encoded_text_gives_the_same_stream(ray_session, prepared, tiny_model_dir, tmp_path, capsys):
    """`python -m vipoly.data.encode` writes tokenised copies of the text files; the stream then
    reads them and yields exactly the rows it yields when it encodes as it goes. Image files are
    left to the streaming encoder; a changed source file makes its copy stale (not used)."""
    import os
    import shutil

    import numpy as np
    import yaml

    from vipoly.data import encode

    root = tmp_path / "data"
    shutil.copytree(prepared, root)
    mix = {"text_pair": 2, "instr": 1, "ocr": 1}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(
        {"data": {"root": str(root), "mix": mix, "shuffle_buffer": 8}, "model": {"backbone": str(tiny_model_dir)}}))
    data = DataConfig(root=str(root), mix=mix, shuffle_buffer=8)
    with build_stream(data, tiny_model_dir, seed=3) as stream:
        streamed = [stream.next() for _ in range(60)]

    summary = encode.main(["--config", str(tmp_path / "cfg.yaml")])
    assert summary["rows"] == 40 and len(summary["skipped"]) == len(task_sources(root)["ocr"])
    assert "pre-encoded 40 rows" in capsys.readouterr().out
    cache = str(root / "_encoded")
    files = task_sources(root)
    assert encoded_files(files["text_pair"], cache, tiny_model_dir) is not None
    assert encoded_files(files["ocr"], cache, tiny_model_dir) is None
    assert resolve_sources(data) == {k: files[k] for k in mix}  # the copies are not sources themselves
    with build_stream(data, tiny_model_dir, seed=3) as stream:
        cached = [stream.next() for _ in range(60)]
    assert [r["id"] for r in cached] == [r["id"] for r in streamed]
    for a, b in zip(cached, streamed):
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k], k

    stale = files["instr"][0]
    os.utime(stale, ns=(os.stat(stale).st_atime_ns, os.stat(stale).st_mtime_ns + 10**9))
    assert encoded_files(files["instr"], cache, tiny_model_dir) is None
    assert encoded_files(files["text_pair"], "", tiny_model_dir) is None  # data.encoded_dir="" turns it off


def test_pre_encoding_for_a_plain_qwen_checkpoint(ray_session, prepared, plain_qwen_dir, tiny_model_dir, tmp_path):
    """With a plain Qwen2-VL checkpoint as the backbone (the hub id of configs/qwen2vl-2b.yaml),
    `python -m vipoly.data.encode` writes `<run.dir>/inputs` as training does, and the copies it
    makes are the ones the training run's stream finds. A PolyEmbedder backbone is never written."""
    import shutil

    import yaml

    from vipoly.config import Config
    from vipoly.data import encode
    from vipoly.train.batches import inputs_dir, write_inputs

    root = tmp_path / "data"
    shutil.copytree(prepared / "instr", root / "instr")
    raw = {"data": {"root": str(root), "mix": {"instr": 1}}, "model": {"backbone": str(plain_qwen_dir)},
           "run": {"dir": str(tmp_path / "run")}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert encode.main(["--config", str(tmp_path / "cfg.yaml")])["rows"] == 20
    cfg = Config.model_validate(raw)
    assert inputs_dir(cfg) == str(tmp_path / "run" / "inputs")
    assert encoded_files(task_sources(root)["instr"], encode.default_cache(cfg.data), write_inputs(cfg)) is not None

    meta = (tiny_model_dir / "vipoly.json").read_bytes()
    own = Config.model_validate({"model": {"backbone": f"{tiny_model_dir}/"}, "run": {"dir": str(tmp_path / "r2")}})
    assert Path(write_inputs(own)) == tiny_model_dir and (tiny_model_dir / "vipoly.json").read_bytes() == meta


def test_encoding_empty_blocks_and_rows_without_content(tiny_model_dir, prepared):
    import pyarrow.parquet as pq

    table = pq.read_table(prepared / "instr")
    empty = encode_table(table.slice(0, 0), str(tiny_model_dir))
    assert empty.num_rows == 0 and table_rows(empty) == []
    bad = table.slice(0, 3).set_column(table.schema.get_field_index("pos_text"), "pos_text",
                                       pa.array(["ok", None, "ok"], pa.string()))
    with pytest.raises(ValueError, match=rf"row '{table.column('id')[1].as_py()}': pos_text and pos_images"):
        encode_table(bad, str(tiny_model_dir))
