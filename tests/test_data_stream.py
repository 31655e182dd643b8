"""The training stream: every worker's share of the global order, read from Parquet (any
filesystem), encoded, repaired and collated; resume on another number of workers; and the
encoding stage itself."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vipoly.data.config import DataConfig
from vipoly.data import synthetic
from vipoly.data.collate import RayPairCollateFn, collate_pairs, load_builder
from vipoly.data.tokenize import SIDES, tokenize_table
from vipoly.data.blocks import row_handles, table_rows
from vipoly.data.pretokenized import default_cache, encoded_files
from vipoly.data.shards import task_sources
from vipoly.data.plan import PlanState
from vipoly.data.stream import PlannedStream, build_plan, resolve_sources
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


def plan_of(prepared, mix, *, batch=8, partitions=4, shuffle=8, seed=0, **data):
    from vipoly.config import Config

    cfg = Config.model_validate({"data": {"root": str(prepared), "mix": mix, "partitions": partitions,
                                          "shuffle_buffer": shuffle, **data},
                                 "train": {"global_batch_size": batch, "batch_size": batch, "grad_accum": 1,
                                           "num_workers": 1, "seed": seed}})
    return build_plan(cfg)


def chunks(plan, world, model_dir, n, state=None, decode_in_tasks=False, **kw):
    """Per chunk, every worker's rows in rank order; and the position after the last one. Images
    decode in this process unless a test asks for Ray tasks (so no test depends on whether an
    earlier one started the session's Ray, and none pays for cold task processes by accident)."""
    streams = [PlannedStream(plan, r, world, model_dir, state=state, decode_in_tasks=decode_in_tasks, **kw)
               for r in range(world)]
    out = []
    for _ in range(n):
        rows, positions = [], []
        for s in streams:
            got, pos = s.next_chunk()
            rows += got
            positions.append(pos)
        out.append(rows)
    for s in streams:
        s.close()
    return out, positions, streams


def test_every_world_trains_on_the_same_samples(prepared, tiny_model_dir):
    """W = 1, 2, 4 workers: the same rows at every position of every chunk, each worker reading
    its own lanes; the chunks collate into model batches and follow the mix."""
    mix = {"text_pair": 2, "ocr": 1, "vqa_multi": 1}
    plan = plan_of(prepared, mix)
    one, pos1, _ = chunks(plan, 1, tiny_model_dir, 12)
    single, _, _ = chunks(plan, 1, tiny_model_dir, 12, group_samples=1)  # selected a chunk at a time
    assert [[r["id"] for r in c] for c in single] == [[r["id"] for r in c] for c in one]
    for world in (2, 4):
        other, pos, _ = chunks(plan, world, tiny_model_dir, 12)
        assert [[r["id"] for r in c] for c in other] == [[r["id"] for r in c] for c in one], world
        assert PlanState.merge(pos).to_dict() == PlanState.merge(pos1).to_dict()
    batch = collate_pairs(one[0], load_builder(str(tiny_model_dir)))
    q, p = batch["query"], batch["pos"]
    assert q["input_ids"].shape[0] == p["input_ids"].shape[0] == 8
    tasks = [TASKS[i] for i in batch["task_ids"].tolist()]
    for t, s in zip(tasks, batch["scores"].tolist()):
        assert (t == "text_pair") == (not math.isnan(s))
    assert q["image_grid_thw"].shape == (sum(t in ("ocr", "vqa_multi") for t in tasks), 3)
    seen = {k: 0 for k in mix}
    for q, c in enumerate(one, 1):  # the exact ratio at every chunk boundary
        for r in c:
            seen[r["id"].split("-")[2]] += 1
        assert all(abs(seen[k] - q * 8 * w / sum(mix.values())) < 1 for k, w in mix.items()), seen


def test_resume_on_another_number_of_workers(prepared, tiny_model_dir):
    plan = plan_of(prepared, {"instr": 1, "vqa_single": 3}, shuffle=4)  # vqa_single (20 rows) wraps
    straight, _, _ = chunks(plan, 2, tiny_model_dir, 9)
    _, saved, _ = chunks(plan, 2, tiny_model_dir, 4)
    state = PlanState.merge(saved).to_dict()
    assert state["chunk"] == 4
    tail, _, _ = chunks(plan, 1, tiny_model_dir, 5, state=state)
    assert [[r["id"] for r in c] for c in tail] == [[r["id"] for r in c] for c in straight[4:]]


def test_each_worker_reads_its_share(tmp_path, tiny_model_dir):
    """Bytes read per worker ≈ 1/W of a source made of many row groups, over one pass."""
    from vipoly.data.schema import SCHEMA

    n = 2400
    rows = {"id": [f"{i:08x}{i * 2654435761 % 2**32:08x}" for i in range(n)], "task": ["instr"] * n,
            "lang": ["vi"] * n, "query_text": [f"câu hỏi số {i} " * 8 for i in range(n)],
            "pos_text": [f"trả lời {i} " * 12 for i in range(n)]}
    (tmp_path / "instr").mkdir()
    table = pa.table({k: rows.get(k, pa.nulls(n, SCHEMA.field(k).type)) for k in SCHEMA.names}, schema=SCHEMA)
    for f in range(3):
        pq.write_table(table.slice(f * 800, 800), tmp_path / "instr" / f"part-{f}.parquet", row_group_size=50,
                       data_page_size=4096)
    metas = [pq.ParquetFile(f).metadata for f in (tmp_path / "instr").glob("*.parquet")]
    size = sum(m.row_group(g).column(c).total_compressed_size  # the data; footers are the plan's
               for m in metas for g in range(m.num_row_groups) for c in range(m.num_columns))
    plan = plan_of(tmp_path, {"instr": 1}, batch=24, partitions=4, shuffle=96)  # 600-row lane slices
    for world in (1, 2, 4):
        # one pass, selected a chunk at a time: the last chunk is selected (read) ahead of the one
        # handed out (by default a stream selects 512 samples ahead, a fifth of this small source)
        _, _, streams = chunks(plan, world, tiny_model_dir, n // 24 - 1, read_ahead=1, group_samples=1)
        read = [s.bytes_read for s in streams]
        assert max(read) < 1.15 * size / world, (world, read, size)  # + a row group where a slice starts
        assert min(read) > 0.85 * size / world, (world, read, size)


def test_file_uri_root_reads_the_same_rows(prepared, tiny_model_dir):
    mix = {"instr": 1, "ocr": 1}
    plain, _, _ = chunks(plan_of(prepared, mix), 1, tiny_model_dir, 3)
    uri, _, _ = chunks(plan_of(f"file://{prepared}", mix), 2, tiny_model_dir, 3)
    assert [[r["id"] for r in c] for c in uri] == [[r["id"] for r in c] for c in plain]


def test_empty_files_and_sources_fail_naming_them(prepared, tmp_path):
    import shutil

    from vipoly.data.schema import SCHEMA

    shutil.copytree(prepared / "instr", tmp_path / "instr")
    pq.write_table(SCHEMA.empty_table(), tmp_path / "instr" / "part-zzz.parquet")
    with pytest.raises(ValueError, match=r"source 'instr': .*part-zzz.parquet has no rows"):
        plan_of(tmp_path, {"instr": 1})
    with pytest.raises(ValueError, match=r"source 'instr' has 20 rows, too few .* data.partitions \(now 64\)"):
        plan_of(prepared, {"instr": 1}, batch=64, partitions=64)


@pytest.mark.parametrize("in_tasks", [False, True], ids=["in_worker", "in_tasks"])
def test_a_corrupt_image_is_skipped_counted_and_quarantined(prepared, tiny_model_dir, tmp_path, in_tasks, request):
    """An image that pipelines.prepare never saw fails to decode mid-stream, in the training worker
    (a CPU run) or in a Ray task (a GPU run): the row is quarantined with its id and reason, and
    its slot is filled from the same source."""
    import json
    import shutil

    if in_tasks:
        request.getfixturevalue("ray_session")

    root = tmp_path / "data"
    shutil.copytree(prepared / "instr", root / "instr")
    (root / "ocr").mkdir()
    bad_ids = []
    for f in sorted((prepared / "ocr").glob("*.parquet")):
        t = pq.read_table(f)
        images = t.column("query_images").to_pylist()
        images[1] = [b"\xff\xd8 not a jpeg"]
        bad_ids.append(t.column("id")[1].as_py())
        t = t.set_column(t.schema.get_field_index("query_images"), "query_images",
                         pa.array(images, t.schema.field("query_images").type))
        pq.write_table(t, root / "ocr" / f.name)
    mix = {"instr": 1, "ocr": 1}
    plan = plan_of(root, mix, batch=8, partitions=2, shuffle=4)
    quarantine = tmp_path / "quarantine.jsonl"
    got, _, streams = chunks(plan, 2, tiny_model_dir, 10, quarantine=quarantine,  # 40 ocr samples: 2 passes
                             decode_in_tasks=in_tasks, decode_task_cpus=4)  # 2 tasks at once of the 8 CPUs
    records = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert {r["id"] for r in records} == set(bad_ids) and all("not an image" in r["reason"] for r in records)
    assert sum(s.bad_rows for s in streams) == len(records) >= len(bad_ids)
    ids = [r["id"] for c in got for r in c]
    assert not set(ids) & set(bad_ids)
    assert all(len(c) == 8 for c in got)
    assert sum(i.split("-")[2] == "ocr" for i in ids) == 40  # the ratio holds


def test_encoded_rows_equal_encode_one(tiny_model_dir, prepared):
    """The Ray Data stage (batched Rust tokenizer for text sides, the image processor for image
    sides, Arrow list columns) gives every row exactly what InputBuilder.encode_one gives it."""
    import pyarrow.parquet as pq

    builder = load_builder(str(tiny_model_dir))
    checked = 0
    for task in TASKS:
        table = pq.read_table(prepared / task)
        enc = tokenize_table(table.slice(1), str(tiny_model_dir))
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

    code = ("import sys, pyarrow.parquet as pq; from vipoly.data.tokenize import tokenize_table; "
            "from vipoly.data.blocks import table_rows; "
            f"t = tokenize_table(pq.read_table({str(prepared / 'instr')!r}), {str(tiny_model_dir)!r}); "
            "assert len(table_rows(t)) == t.num_rows; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_equal_positives_get_equal_keys(tiny_model_dir, prepared):
    """pos_key: the same positive text and image bytes give the same key, whatever the task or
    the query; one byte more in the image, or another text, another key."""
    source = pq.read_table(prepared / "vqa_single")
    base = source.slice(0, 1).to_pylist()[0]
    image = base["query_images"][0]
    rows = [{**base, "id": "a", "pos_text": "yes"}, {**base, "id": "b", "query_text": "other?", "pos_text": "yes"},
            {**base, "id": "c", "pos_text": "no"}, {**base, "id": "d", "task": "vqa_multi", "pos_text": "yes"},
            {**base, "id": "e", "pos_text": "yes", "pos_images": [image]},
            {**base, "id": "f", "pos_text": "yes", "pos_images": [image]},
            {**base, "id": "g", "pos_text": "yes", "pos_images": [image + b"\0"]}]
    enc = tokenize_table(pa.Table.from_pylist(rows, schema=source.schema), str(tiny_model_dir))
    keys = collate_pairs(row_handles(enc), load_builder(str(tiny_model_dir)))["pos_key"].tolist()
    assert keys[0] == keys[1] == keys[3] and keys[4] == keys[5]
    assert len({keys[0], keys[2], keys[4], keys[6]}) == 4


def test_hard_negatives_are_tokenised_as_positives(tiny_model_dir, prepared):
    """data.negatives: up to N of each row's neg_text, tokenised as a positive with that text
    would be, in row order after the sides; rows with fewer give fewer; keys as positives'."""
    from vipoly.data.collate import hard_negatives

    source = pq.read_table(prepared / "vqa_single")
    base = source.slice(0, 1).to_pylist()[0]
    rows = [{**base, "id": "a", "neg_text": ["no", "maybe", "never"]}, {**base, "id": "b", "neg_text": []},
            {**base, "id": "c", "neg_text": ["yes"]}]
    enc = tokenize_table(pa.Table.from_pylist(rows, schema=source.schema), str(tiny_model_dir))
    negs = hard_negatives(row_handles(enc), 2, str(tiny_model_dir))
    assert negs["neg_owner"].tolist() == [0, 0, 2]
    as_positives = tokenize_table(pa.Table.from_pylist([{**base, "pos_text": t, "pos_images": []}
                                                      for t in ("no", "maybe", "yes")], schema=source.schema),
                                str(tiny_model_dir))
    want = [row_handles(as_positives)[i].side("p") for i in range(3)]
    assert all(np.array_equal(got, w["input_ids"]) for got, w in zip(negs["input_ids"], want))
    assert negs["neg_key"].tolist() == as_positives.column("p_key").to_pylist()
    assert hard_negatives(table_rows(enc), 2, str(tiny_model_dir))["neg_owner"].tolist() == [0, 0, 2]


def test_ray_collate_equals_row_collate(tiny_model_dir, prepared):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(prepared / "vqa_single").slice(0, 3), pq.read_table(prepared / "instr").slice(0, 2)])
    enc = tokenize_table(table, str(tiny_model_dir))
    via_ray = RayPairCollateFn(tiny_model_dir)(enc)
    via_rows = collate_pairs(table_rows(enc), load_builder(str(tiny_model_dir)))
    assert_same_batch(via_ray, via_rows)
    assert via_ray["task_ids"].tolist() == [3, 3, 3, 1, 1]
    assert torch.isnan(via_ray["scores"]).all()
    assert via_ray["query"]["image_grid_thw"].shape == (3, 3) and "pixel_values" not in via_ray["pos"]


@pytest.mark.parametrize("tasks", [("text_pair", "ocr", "vqa_multi"), ("text_pair", "instr", "instr")])
def test_block_rows_collate_as_dicts(tiny_model_dir, prepared, tasks):
    """The stream's row handles, drawn from several blocks in an interleaved order (as the mixer
    hands them out), collate to exactly the batch their dicts give, the first time and again (text
    blocks keep their token views and labels); a handle reads as its dict."""
    import pyarrow.parquet as pq

    builder = load_builder(str(tiny_model_dir))
    blocks = [tokenize_table(pq.read_table(prepared / task).slice(1, 6), str(tiny_model_dir)) for task in tasks]
    handles = [row_handles(b.slice(1)) for b in blocks]  # sliced: offsets that do not start at 0
    dicts = [table_rows(b.slice(1)) for b in blocks]
    order = [(b, i) for i in range(5) for b in (2, 0, 1)][::-1]
    batch_h = [handles[b][i] for b, i in order]
    batch_d = [dicts[b][i] for b, i in order]
    want = collate_pairs(batch_d, builder)
    assert_same_batch(collate_pairs(batch_h, builder), want)
    assert_same_batch(collate_pairs(batch_h, builder), want)  # the blocks' views and labels, made by the first
    assert_same_batch(collate_pairs(batch_h[:7] + batch_d[7:], builder), want)  # handles and dicts mixed
    images = want["query"]["image_grid_thw"].shape[0] if "image_grid_thw" in want["query"] else 0
    assert images == (10 if "ocr" in tasks else 0)
    row = batch_h[0]
    assert row.keys() == batch_d[0].keys() and row.get("task") == tasks[1] and row.get("missing", 7) == 7
    assert all(np.array_equal(row[k], v) if isinstance(v, np.ndarray) else row[k] == v for k, v in batch_d[0].items())


def assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for side in ("query", "pos"):
        assert a[side].keys() == b[side].keys()
        for k in a[side]:
            assert a[side][k].dtype == b[side][k].dtype and torch.equal(a[side][k], b[side][k]), (side, k)
    assert torch.equal(a["task_ids"], b["task_ids"]) and torch.equal(a["scores"].isnan(), b["scores"].isnan())
    assert torch.equal(a["pos_key"], b["pos_key"])
    assert torch.equal(a["scores"].nan_to_num(-1), b["scores"].nan_to_num(-1))
    assert a["lang"] == b["lang"] and a["id"] == b["id"]


def test_pre_encoded_text_gives_the_same_stream(ray_session, prepared, tiny_model_dir, tmp_path, capsys):
    """`python -m pipelines.pretokenize` writes tokenised copies of the text files; the stream then
    reads them and yields exactly the rows it yields when it encodes as it goes. Image files are
    left to tokenise as they stream; a changed source file makes its copy stale (not used)."""
    import os
    import shutil

    import numpy as np
    import yaml

    from pipelines import pretokenize

    root = tmp_path / "data"
    shutil.copytree(prepared, root)
    mix = {"text_pair": 2, "instr": 1, "ocr": 1}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(
        {"data": {"root": str(root), "mix": mix, "shuffle_buffer": 8}, "model": {"backbone": str(tiny_model_dir)}}))
    data = DataConfig(root=str(root), mix=mix, shuffle_buffer=8)
    plan = plan_of(root, mix, seed=3)
    streamed = [r for c in chunks(plan, 1, tiny_model_dir, 8)[0] for r in c]

    summary = pretokenize.main(["--config", str(tmp_path / "cfg.yaml")])
    assert summary["rows"] == 40 and len(summary["skipped"]) == len(task_sources(root)["ocr"])
    assert "pre-tokenised 40 rows" in capsys.readouterr().out
    cache = str(root / "_encoded")
    files = task_sources(root)
    assert encoded_files(files["text_pair"], cache, tiny_model_dir) is not None
    assert encoded_files(files["ocr"], cache, tiny_model_dir) is None
    assert resolve_sources(data) == {k: files[k] for k in mix}  # the copies are not sources themselves
    copies = {k: encoded_files(files[k], cache, tiny_model_dir) for k in mix}
    assert copies["text_pair"] and copies["instr"] and copies["ocr"] is None
    cached = [r for c in chunks(plan, 2, tiny_model_dir, 8, encoded=copies)[0] for r in c]
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
    `python -m pipelines.pretokenize` writes `<run.dir>/inputs` as training does, and the copies it
    makes are the ones the training run's stream finds. A PolyEmbedder backbone is never written:
    its inputs go to `<run.dir>/inputs` too."""
    import shutil

    import yaml

    from vipoly.config import Config
    from pipelines import pretokenize
    from vipoly.model.inputs import inputs_dir, write_inputs

    root = tmp_path / "data"
    shutil.copytree(prepared / "instr", root / "instr")
    raw = {"data": {"root": str(root), "mix": {"instr": 1}}, "model": {"backbone": str(plain_qwen_dir)},
           "run": {"dir": str(tmp_path / "run")}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert pretokenize.main(["--config", str(tmp_path / "cfg.yaml")])["rows"] == 20
    cfg = Config.model_validate(raw)
    assert inputs_dir(cfg) == str(tmp_path / "run" / "inputs")
    assert encoded_files(task_sources(root)["instr"], default_cache(cfg.data), write_inputs(cfg)) is not None

    before = {p: p.read_bytes() for p in tiny_model_dir.rglob("*") if p.is_file()}
    own = Config.model_validate({"model": {"backbone": f"{tiny_model_dir}/"}, "run": {"dir": str(tmp_path / "r2")}})
    assert write_inputs(own) == str(tmp_path / "r2" / "inputs")
    assert {p: p.read_bytes() for p in tiny_model_dir.rglob("*") if p.is_file()} == before


def test_encoding_empty_blocks_and_rows_without_content(tiny_model_dir, prepared):
    import pyarrow.parquet as pq

    table = pq.read_table(prepared / "instr")
    empty = tokenize_table(table.slice(0, 0), str(tiny_model_dir))
    assert empty.num_rows == 0 and table_rows(empty) == []
    bad = table.slice(0, 3).set_column(table.schema.get_field_index("pos_text"), "pos_text",
                                       pa.array(["ok", None, "ok"], pa.string()))
    with pytest.raises(ValueError, match=rf"row '{table.column('id')[1].as_py()}': pos_text and pos_images"):
        tokenize_table(bad, str(tiny_model_dir))


def test_a_text_row_without_content_is_replaced_too(prepared, tiny_model_dir, tmp_path):
    """Text windows are tokenised when read; a row that cannot be (no query at all) is quarantined
    and its slot filled from the same lane, as an image that does not decode is."""
    import json

    (tmp_path / "instr").mkdir()
    t = pq.read_table(prepared / "instr")
    texts = t.column("query_text").to_pylist()
    texts[3] = None
    bad_id = t.column("id")[3].as_py()
    pq.write_table(t.set_column(t.schema.get_field_index("query_text"), "query_text", pa.array(texts, pa.string())),
                   tmp_path / "instr" / "part-0.parquet")
    quarantine = tmp_path / "q.jsonl"
    got, _, streams = chunks(plan_of(tmp_path, {"instr": 1}, batch=4, partitions=2, shuffle=4), 1, tiny_model_dir,
                             10, quarantine=quarantine)  # 40 samples: 2 passes over 20 rows
    records = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [r["id"] for r in records] == [bad_id, bad_id] and "query_text and query_images" in records[0]["reason"]
    ids = [r["id"] for c in got for r in c]
    assert bad_id not in ids and len(ids) == 40 and streams[0].bad_rows == 2
    _, position, _ = chunks(plan_of(tmp_path, {"instr": 1}, batch=4, partitions=2, shuffle=4), 2, tiny_model_dir, 10)
    resumed = PlannedStream(plan_of(tmp_path, {"instr": 1}, batch=4, partitions=2, shuffle=4), 0, 1, tiny_model_dir,
                            state=PlanState.merge(position).to_dict())
    assert resumed.bad_rows == 2  # the count comes back with the position, whatever the number of workers


def test_memory_does_not_grow_with_the_shuffle_buffer_beyond_raw_bytes(tmp_path, tiny_model_dir):
    """448² JPEG pages (patches ≈ 4.8 MB each once encoded): raising data.shuffle_buffer from 8 to
    600 adds at most the raw bytes of the extra rows held, never their patches."""
    from vipoly.config import Config
    from vipoly.data.schema import SCHEMA
    from vipoly.data.synthetic import jpeg_pages
    from vipoly.model.inputs import write_inputs

    pages = jpeg_pages(16, grain=28)
    n = 800
    images = [[pages[i % len(pages)]] for i in range(n)]
    cols = {"id": [f"page-{i:05d}" for i in range(n)], "task": ["ocr"] * n, "lang": ["vi"] * n,
            "query_images": images, "pos_text": [f"văn bản trang {i}" for i in range(n)]}
    (tmp_path / "ocr").mkdir()
    pq.write_table(pa.table({k: cols.get(k, pa.nulls(n, SCHEMA.field(k).type)) for k in SCHEMA.names}, schema=SCHEMA),
                   tmp_path / "ocr" / "part-0.parquet", row_group_size=64, use_dictionary=False)
    raw_row = (tmp_path / "ocr" / "part-0.parquet").stat().st_size / n
    model_dir = write_inputs(Config.model_validate({
        "model": {"backbone": str(tiny_model_dir), "max_length": 1024, "image_max_pixels": 448 * 448},
        "run": {"dir": str(tmp_path / "run")}}))

    def peak(buffer: int) -> int:
        plan = plan_of(tmp_path, {"ocr": 1}, batch=4, partitions=4, shuffle=buffer)
        base, top = pa.total_allocated_bytes(), 0
        with PlannedStream(plan, 0, 1, model_dir, read_ahead=1) as stream:
            for _ in range(12):
                rows, _ = stream.next_chunk()
                assert rows[0]["q_pixel_values"].shape == (3136, 384)  # 448² in 8-px patches: 4.8 MB
                top = max(top, pa.total_allocated_bytes() - base)
                del rows
        return top

    small, large = peak(8), peak(600)
    assert large - small < 1.5 * 600 * raw_row, (small, large, raw_row)
    assert large < 600 * 4.8e6 / 20, (small, large)
