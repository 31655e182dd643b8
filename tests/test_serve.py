"""The Ray Serve embedding service on 127.0.0.1, driven by the real `openai` client and `httpx`:
vectors equal `PolyEmbedder.encode`, `dimensions`, images as data URLs, every bad request's 400,
dynamic batching of concurrent requests, and search over a small index of NTREX sentences."""
from __future__ import annotations

import base64
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vipoly.serve.api import Limits

MAX_ITEMS, MAX_BODY = 8, 64 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(color=(200, 30, 90), size=(40, 28)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def sentences(eval_data) -> list[str]:
    return (eval_data / "ntrex128" / "newstest2019-ref.vie.txt").read_text(encoding="utf-8").split("\n")[:300]


@pytest.fixture(scope="module")
def index_db(tiny_model, sentences, tmp_path_factory) -> str:
    from vipoly.search import build_index

    root = tmp_path_factory.mktemp("serve_index")
    emb = tiny_model.encode(sentences)
    (root / "emb").mkdir()
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(len(sentences))],
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
                             "text": sentences}), root / "emb" / "part-0.parquet")
    build_index(root / "emb", str(root / "db"))
    return str(root / "db")


@pytest.fixture(scope="module")
def service(ray_session, tiny_model_dir, index_db):
    from ray import serve

    from vipoly.serve.app import ServeConfig, build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(model=str(tiny_model_dir), index=index_db, port=port, max_batch_size=16,
                      batch_wait_timeout_s=0.05, cpus_per_replica=1,
                      limits=Limits(max_items=MAX_ITEMS, max_body_bytes=MAX_BODY))
    serve.run(build_app(cfg), name="vipoly-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "service did not come up"
        time.sleep(0.3)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def client(service):
    from openai import OpenAI

    return OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0)


def test_health(service, tiny_model):
    body = httpx.get(f"{service}/health").json()
    assert body["status"] == "ok" and body["dim"] == tiny_model.embedding_dim
    assert body["index"]["rows"] == 300


def test_openai_client_vectors_equal_encode(client, tiny_model, sentences):
    texts = sentences[:5]
    ref = tiny_model.encode(texts)
    # not given: the client asks for base64 and decodes it itself; given: it hands back what came
    for fmt in (None, "base64", "float"):
        kw = {} if fmt is None else {"encoding_format": fmt}
        resp = client.embeddings.create(model="vipoly", input=texts, **kw)
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
                        for d in resp.data], dtype=np.float32)
        assert [d.index for d in resp.data] == list(range(5))
        np.testing.assert_allclose(got, ref, atol=1e-5)
    tokens = sum(len(tiny_model.inputs.encode_one(t)["input_ids"]) for t in texts)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == tokens
    one = client.embeddings.create(model="vipoly", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, ref[0], atol=1e-5)


def test_dimensions_task_and_images(client, service, tiny_model, sentences):
    resp = client.embeddings.create(model="vipoly", input=sentences[5:8], dimensions=16, encoding_format="float")
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    assert got.shape == (3, 16)
    np.testing.assert_allclose(got, tiny_model.encode(sentences[5:8], dim=16), atol=1e-5)

    png = _png()
    body = {"model": "vipoly", "task": "ocr", "encoding_format": "float",
            "input": [{"text": "hóa đơn tiền điện", "image": _data_url(png)}, {"image": _data_url(png)},
                      {"text": sentences[9], "task": "instr"}]}
    r = httpx.post(f"{service}/v1/embeddings", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(got[0], tiny_model.encode(texts=["hóa đơn tiền điện"], images=[png], task="ocr")[0],
                               atol=1e-5)
    np.testing.assert_allclose(got[1], tiny_model.encode(images=[png], task="ocr")[0], atol=1e-5)
    np.testing.assert_allclose(got[2], tiny_model.encode([sentences[9]], task="instr")[0], atol=1e-5)


BAD = [  # (what is sent: a JSON body, or raw bytes), the field the error must name
    ({"model": "vipoly"}, "input"),
    ({"input": []}, "input"),
    ({"input": ""}, "input[0]"),
    ({"input": 5}, "input"),
    ({"input": [1, 2, 3]}, "input"),
    ({"input": ["a", 7]}, "input[1]"),
    ({"input": ["x"] * (MAX_ITEMS + 1)}, "input"),
    ({"input": [{"text": 3}]}, "input[0].text"),
    ({"input": [{"image": "/etc/passwd"}]}, "input[0].image"),
    ({"input": [{"image": "https://example.com/a.png"}]}, "input[0].image"),
    ({"input": [{"image": "data:image/png;base64,bm90IGFuIGltYWdl"}]}, "input[0].image"),
    ({"input": [{"image": "data:image/png;base64,%%%"}]}, "input[0].image"),
    ({"input": [{"text": "a", "path": "x"}]}, "input[0]"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "dimensions": "16"}, "dimensions"),
    ({"input": "a", "dimensions": 10_000}, "dimensions"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "a", "task": "poetry"}, "task"),
    ({"input": [{"text": "a", "task": 1}]}, "input[0].task"),
    ({"input": "a", "model": 3}, "model"),
    ({"input": "a", "temperature": 1}, "temperature"),
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (b'{"input": "' + b"x" * MAX_BODY + b'"}', "body"),
]


@pytest.mark.parametrize("sent,param", BAD, ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD)])
def test_bad_requests_get_400_naming_the_field(service, sent, param):
    kw = {"content": sent, "headers": {"content-type": "application/json"}} if isinstance(sent, bytes) else {"json": sent}
    r = httpx.post(f"{service}/v1/embeddings", timeout=30, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert "/etc/passwd" not in err["message"] or param == "input[0].image"


def test_openai_client_raises_bad_request(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="vipoly", input="xin chào", dimensions=0)


def test_concurrent_requests_are_batched(service, tiny_model, sentences):
    before = len(httpx.get(f"{service}/v1/stats").json()["batch_sizes"])
    texts = sentences[20:52]

    def one(t):
        r = httpx.post(f"{service}/v1/embeddings", json={"input": t, "encoding_format": "float"}, timeout=120)
        r.raise_for_status()
        return r.json()["data"][0]["embedding"]

    with ThreadPoolExecutor(16) as pool:
        got = np.array(list(pool.map(one, texts)), dtype=np.float32)
    np.testing.assert_allclose(got, tiny_model.encode(texts), atol=1e-5)
    sizes = httpx.get(f"{service}/v1/stats").json()["batch_sizes"][before:]
    assert sum(sizes) == len(texts)  # every item went through the batcher once
    assert max(sizes) > 1, sizes  # concurrent requests shared forward passes
    assert max(sizes) <= 16


def test_search_endpoint_finds_the_corpus_text(service, sentences):
    r = httpx.post(f"{service}/v1/search", json={"query": sentences[42], "k": 5}, timeout=60)
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert len(hits) == 5 and hits[0]["id"] == "s42" and hits[0]["text"] == sentences[42]
    assert hits[0]["rank"] == 1 and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    bad = httpx.post(f"{service}/v1/search", json={"query": "x", "k": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "k"


def test_cli_listens_on_loopback_and_checks_before_starting(tiny_model_dir, tmp_path):
    from pipelines import serve as cli

    cfg = cli.config(cli.build_parser().parse_args(["--model", str(tiny_model_dir)]))
    assert (cfg.host, cfg.port, cfg.replicas, cfg.max_replicas) == ("127.0.0.1", 8000, 1, None)
    with pytest.raises(ValueError, match="not a saved PolyEmbedder"):
        cli.config(cli.build_parser().parse_args(["--model", str(tmp_path)]))
    with pytest.raises(ValueError, match="no such database folder"):
        cli.config(cli.build_parser().parse_args(["--model", str(tiny_model_dir), "--index", str(tmp_path / "db")]))
    assert not (tmp_path / "db").exists()
    auto = cli.config(cli.build_parser().parse_args(["--model", str(tiny_model_dir), "--max-replicas", "4",
                                                     "--gpus-per-replica", "0.5"]))
    from vipoly.serve.app import build_app

    deployment = build_app(auto)._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    assert deployment.ray_actor_options["num_gpus"] == 0.5
