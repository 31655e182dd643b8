"""The path from a corpus to answers: pipelines.embed --format lance → pipelines.index → pipelines.search,
on real NTREX sentences and small generated images."""
from __future__ import annotations

import io
import json

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vipoly.embed.output import LANCE


def _ntrex_vi(eval_data) -> list[str]:
    lines = (eval_data / "ntrex128" / "newstest2019-ref.vie.txt").read_text(encoding="utf-8").split("\n")
    return [x for x in lines if x.strip()]


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 28), color).save(buf, "PNG")
    return buf.getvalue()


def test_embed_lance_then_index_then_search(ray_session, tiny_model_dir, tiny_model, eval_data, tmp_path, capsys):
    from pipelines import embed, index
    from pipelines import search as search_cli

    vi = _ntrex_vi(eval_data)[:30]
    rows = [{"id": f"v{i}", "text": t, "image": _png((8 * i, 90, 200)) if i % 10 == 0 else None}
            for i, t in enumerate(vi)]
    rows.append({"id": "v3", "text": "a second row with id v3", "image": None})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = tmp_path / "emb"
    args = ["--model", str(tiny_model_dir), "--input", str(tmp_path / "in.parquet"), "--output", str(out),
            "--format", "lance", "--batch-size", "8", "--cpus-per-actor", "1"]
    summary = embed.run(embed.build_parser().parse_args(args))
    assert summary["embedded"] == 30 and summary["errors"] == 1  # the second v3

    table = lance.dataset(str(out / LANCE)).to_table()
    assert table.column_names == ["id", "vector", "text", "image", "model", "dim"]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), tiny_model.embedding_dim)
    got = dict(zip(table.column("id").to_pylist(), table.to_pylist()))
    assert sorted(got) == sorted(f"v{i}" for i in range(30))
    for i in (0, 1, 7):
        r = got[f"v{i}"]
        ref = tiny_model.encode(texts=[vi[i]], images=[rows[i]["image"]] if rows[i]["image"] else None)[0]
        np.testing.assert_allclose(r["vector"], ref, atol=1e-4)
        assert r["text"] == vi[i]
    assert got["v0"]["image"].endswith("in.parquet#id=v0") and got["v1"]["image"] is None

    again = embed.run(embed.build_parser().parse_args(args))  # resumable: nothing left to embed
    assert again["embedded"] == 0 and lance.dataset(str(out / LANCE)).count_rows() == 30

    db = tmp_path / "db"
    assert index.main(["--embeddings", str(out), "--out", str(db)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 30 and report["plan"]["kind"] == "exact"  # small: exact search
    assert (db / "embeddings.index.json").is_file()

    assert search_cli.main(["--index", str(db), "--model", str(tiny_model_dir), "--query", vi[7], "--k", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [h["rank"] for h in lines] == [1, 2, 3]
    assert lines[0]["id"] == "v7" and lines[0]["text"] == vi[7] and lines[0]["score"] == pytest.approx(1, abs=1e-4)
    assert search_cli.main(["--index", str(tmp_path / "nowhere"), "--model", str(tiny_model_dir),
                            "--query", "x"]) == 2
