"""PolyEmbedder on the tiny random Qwen2-VL: save/load, encode contract, padding invariance,
pooling against float64 loops, gradients, input errors, loading a plain Qwen2-VL folder."""
from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vipoly.model.config import ModelConfig, PoolingConfig, PoolingKind, ProjectionConfig
from vipoly.model import (AttentionPooling, InputBuilder, LastTokenPooling, MeanPooling, MultiHeadAttentionPooling,
                          PolyEmbedder, ProjectionHead, build_pooling, component_of, decode_image, matryoshka)
from vipoly.tasks import TASKS

TEXTS = ["Xin chào thế giới, hôm nay trời đẹp quá.", "Hello", "你好，世界！今天天气很好。",
         "A much longer English sentence about a farmer who rides a bicycle to the market in Hanoi every day."]


def png(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def jpeg(size=(50, 70)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# Sizes differ on purpose: different grids, different numbers of image tokens in one batch.
IMAGES = [png((255, 0, 0)), Image.new("RGBA", (100, 20), (0, 255, 0, 128)), jpeg(), png((0, 0, 255), (17, 90))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is far too small for intra-op threads: on 2 busy cores their spin-waits
    made each image forward 10-20× slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def fresh_model(tiny_model_dir):
    """A private copy for tests that train or change the model (the session `tiny_model` is shared)."""
    torch.manual_seed(0)
    return PolyEmbedder.from_pretrained(tiny_model_dir)


# ---------------------------------------------------------------- save / load
def test_round_trip_gives_identical_vectors(tiny_model, tmp_path):
    saved = tiny_model.save_pretrained(tmp_path / "copy")
    files = {p.name for p in saved.iterdir()}
    assert {"vipoly.json", "config.json", "heads.safetensors", "tokenizer.json", "preprocessor_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], files
    meta = json.loads((saved / "vipoly.json").read_text())
    assert meta["name"] == "vipoly-tiny" and meta["embedding_dim"] == 32 and meta["model"]["projection"]["out_dim"] == 32

    loaded = PolyEmbedder.from_pretrained(saved).eval()
    for kwargs in ({"texts": TEXTS}, {"images": IMAGES}, {"texts": TEXTS, "images": IMAGES, "task": "ocr"}):
        np.testing.assert_array_equal(loaded.encode(**kwargs), tiny_model.encode(**kwargs))
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_build_from_a_polyembedder_dir_applies_only_explicit_fields(tiny_model_dir, tiny_model):
    same = PolyEmbedder.build(ModelConfig.model_validate({"backbone": str(tiny_model_dir)}))
    assert same.cfg.projection.out_dim == 32  # the saved value, not the default 1024
    np.testing.assert_array_equal(same.eval().encode(TEXTS), tiny_model.encode(TEXTS))

    cfg = ModelConfig.model_validate({"backbone": str(tiny_model_dir), "pooling": {"kind": "mean"}, "max_length": 64})
    ablation = PolyEmbedder.build(cfg)
    assert isinstance(ablation.pooling, MeanPooling)
    assert ablation.cfg.max_length == 64 and ablation.cfg.projection.out_dim == 32
    # The projection config is unchanged, so its trained weights are kept.
    assert torch.equal(ablation.projection.w1.weight, tiny_model.projection.w1.weight)


def test_a_runs_tiny_model_has_the_runs_heads(tmp_path, caplog):
    """`model.backbone: tiny` builds the initial model with the run's pooling and projection, so
    the run loads its heads (the demo printed "config differs … starting fresh projection weights"
    on every run, since configs/tiny-cpu.yaml sets out_dim 64 and the tiny model had 32)."""
    import logging

    from vipoly.config import load_config
    from vipoly.model.tiny import build_tiny

    run = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml").model
    build_tiny(tmp_path, heads=run)
    saved = json.loads((tmp_path / "vipoly.json").read_text())["model"]
    assert saved["projection"]["out_dim"] == run.projection.out_dim == 64
    assert saved["pooling"] == run.pooling.model_dump(mode="json")
    with caplog.at_level(logging.INFO, logger="vipoly"):
        model = PolyEmbedder.build(run.model_copy(update={"backbone": str(tmp_path)}))
    assert "config differs" not in caplog.text and model.cfg.projection.out_dim == 64


def test_build_from_a_plain_qwen2vl_folder(plain_qwen_dir, tmp_path):
    """A Qwen2-VL checkpoint as the hub ships it (with LM head, no task tokens) → fresh heads."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    full = Qwen2VLForConditionalGeneration.from_pretrained(plain_qwen_dir)
    tokenizer = AutoTokenizer.from_pretrained(plain_qwen_dir)
    model = PolyEmbedder.build(ModelConfig(backbone=str(plain_qwen_dir), projection=ProjectionConfig(out_dim=16,
                                           matryoshka_dims=[16, 8]), image_max_pixels=64 * 64, image_min_pixels=256))
    assert model.name == "vipoly-qwen" and model.embedding_dim == 16
    visual = dict(full.model.visual.named_parameters())
    for name, p in model.backbone.visual.named_parameters():
        assert torch.equal(p, visual[name]), name
    assert len(model.processor.tokenizer) == len(tokenizer) + len(TASKS)
    assert model.backbone.get_input_embeddings().weight.shape[0] >= len(model.processor.tokenizer)
    assert all(len(model.inputs.prefix_ids[t]) == 1 for t in TASKS)
    e = model.eval().encode(TEXTS[:2], IMAGES[:2], task="vqa_single")
    assert e.shape == (2, 16) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)

    # Training from such a checkpoint: the data workers get the same inputs from a weightless folder.
    from vipoly.config import Config
    from vipoly.data.tokenize import TextEncoder
    from vipoly.model.inputs import inputs_dir, write_inputs

    cfg = Config.model_validate({"model": model.cfg.model_dump(), "run": {"dir": str(tmp_path / "run")}})
    assert inputs_dir(cfg) == str(tmp_path / "run" / "inputs")
    builder = InputBuilder.from_pretrained(write_inputs(cfg))
    assert builder.prefix_ids == model.inputs.prefix_ids == TextEncoder(inputs_dir(cfg)).prefix_ids
    for got, want in zip(builder.encode_one(TEXTS[0], IMAGES[0], "ocr").values(),
                         model.inputs.encode_one(TEXTS[0], IMAGES[0], "ocr").values()):
        assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="format"):
        PolyEmbedder.from_pretrained(inputs_dir(cfg))


def test_training_inputs_follow_the_model_config_of_a_polyembedder_backbone(tiny_model_dir, tmp_path):
    """`--set model.max_length=…` on a PolyEmbedder backbone reaches the data workers as it reaches
    the model: both read one effective config; the backbone folder is only read."""
    from vipoly.config import Config
    from vipoly.data.tokenize import TextEncoder
    from vipoly.model.inputs import apply_explicit, effective_model_config, inputs_dir, write_inputs

    before = {p: p.read_bytes() for p in tiny_model_dir.rglob("*") if p.is_file()}
    cfg = Config.model_validate({"model": {"backbone": str(tiny_model_dir), "max_length": 40, "image_max_pixels": 3136},
                                 "run": {"dir": str(tmp_path / "run")}})
    assert TextEncoder(write_inputs(cfg)).max_length == 40
    builder = InputBuilder.from_pretrained(inputs_dir(cfg))
    assert builder.cfg.image_max_pixels == 3136
    assert builder.cfg.projection.out_dim == 32 and builder.cfg.image_min_pixels == 256  # unset: the saved values
    model = PolyEmbedder.build(cfg.model)
    assert builder.cfg.model_dump(exclude={"backbone"}) == model.cfg.model_dump(exclude={"backbone"})
    assert builder.prefix_ids == model.inputs.prefix_ids
    # Handed on as a whole (a worker's config comes from a dict: every field set), it still builds the same.
    effective = effective_model_config(cfg.model)
    as_dict = ModelConfig.model_validate(effective.model_dump(mode="json"))
    assert as_dict.backbone == str(tiny_model_dir) and apply_explicit(model.cfg, as_dict) == model.cfg
    assert {p: p.read_bytes() for p in tiny_model_dir.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- encode contract
@pytest.mark.parametrize("kwargs,n", [({"texts": TEXTS}, 4), ({"images": IMAGES}, 4),
                                      ({"texts": TEXTS, "images": IMAGES}, 4), ({"texts": "one text"}, 1),
                                      ({"images": IMAGES[0]}, 1)])
def test_encode_shapes_and_norms(tiny_model, kwargs, n):
    e = tiny_model.encode(**kwargs)
    assert e.dtype == np.float32 and e.shape == (n, tiny_model.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_forward_output_fields(tiny_model):
    batch = tiny_model.inputs.pad([tiny_model.inputs.encode_one(t, im, "ocr") for t, im in zip(TEXTS, IMAGES)])
    with torch.no_grad():
        out = tiny_model(**batch)
    b, n = batch["input_ids"].shape
    assert out.embedding.shape == (b, 32) and out.pooled.shape == (b, 64) and out.pooling_weights.shape == (b, n)
    assert out.embedding.dtype == out.pooled.dtype == out.pooling_weights.dtype == torch.float32
    mask = batch["attention_mask"].bool()
    assert torch.equal(out.attention_mask, batch["attention_mask"])
    torch.testing.assert_close(out.pooling_weights.sum(-1), torch.ones(b))
    assert (out.pooling_weights[~mask] == 0).all()


@pytest.mark.parametrize("kind", ["text", "image", "pair"])
def test_padding_invariance(tiny_model, kind):
    texts = TEXTS if kind != "image" else None
    images = IMAGES if kind != "text" else None
    together = tiny_model.encode(texts, images, task="vqa_single", batch_size=4)
    small = tiny_model.encode(texts, images, task="vqa_single", batch_size=3)
    alone = np.concatenate([tiny_model.encode(None if texts is None else [texts[i]],
                                              None if images is None else [images[i]], task="vqa_single")
                            for i in range(4)])
    np.testing.assert_allclose(together, alone, atol=1e-4, rtol=0)
    np.testing.assert_allclose(small, alone, atol=1e-4, rtol=0)


def test_mixed_rows_with_and_without_images(tiny_model):
    """A batch where some rows have an image and some do not (M-RoPE for some rows only)."""
    images = [IMAGES[0], None, IMAGES[2], None]
    together = tiny_model.encode(TEXTS, images)
    alone = np.concatenate([tiny_model.encode([t], [im]) for t, im in zip(TEXTS, images)])
    np.testing.assert_allclose(together, alone, atol=1e-4, rtol=0)
    np.testing.assert_allclose(together[1], tiny_model.encode([TEXTS[1]])[0], atol=1e-6)


def test_task_prefix_changes_the_vector(tiny_model):
    plain = tiny_model.encode(TEXTS[:2])
    by_task = {t: tiny_model.encode(TEXTS[:2], task=t) for t in TASKS}
    for t, e in by_task.items():
        assert np.abs(e - plain).max() > 1e-3, t
    assert np.abs(by_task["ocr"] - by_task["instr"]).max() > 1e-4
    # Each prefix is one token and comes first.
    for t in TASKS:
        row = tiny_model.inputs.encode_one("x", None, t)
        assert row["input_ids"][0] == tiny_model.inputs.prefix_ids[t][0] and len(tiny_model.inputs.prefix_ids[t]) == 1


def test_matryoshka_dim(tiny_model):
    full = tiny_model.encode(TEXTS)
    for dim in (16, 8):
        e = tiny_model.encode(TEXTS, dim=dim)
        assert e.shape == (4, dim)
        ref = full[:, :dim] / np.linalg.norm(full[:, :dim], axis=1, keepdims=True)
        np.testing.assert_allclose(e, ref, atol=1e-5)
    np.testing.assert_array_equal(tiny_model.encode(TEXTS, dim=32), full)


def test_image_forms_give_the_same_vector(tiny_model, tmp_path):
    data = png((10, 200, 30))
    path = tmp_path / "img.png"
    path.write_bytes(data)
    forms = [data, str(path), path, Image.open(io.BytesIO(data)), {"bytes": data, "path": None},
             np.asarray(Image.open(io.BytesIO(data)))]
    vectors = np.concatenate([tiny_model.encode(images=[f]) for f in forms])
    np.testing.assert_allclose(vectors, np.repeat(vectors[:1], len(forms), 0), atol=1e-6)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,message", [
    ({}, "nothing to encode"),
    ({"texts": [], "images": []}, "nothing to encode"),
    ({"texts": ["a", "b"], "images": [IMAGES[0]]}, "different lengths"),
    ({"texts": ["a", "b"], "images": [IMAGES[0], b"this is not an image"]}, r"images\[1\].*not an image"),
    ({"images": [IMAGES[0], IMAGES[1], "/no/such/file.png"]}, r"images\[2\].*no such file"),
    ({"images": [IMAGES[0], 3.5]}, r"images\[1\].*not an image.*float"),
    ({"texts": ["a", 7]}, r"texts\[1\] is not a string"),
    ({"texts": ["a", None], "images": [None, None]}, r"row 1.*neither text nor image"),
    ({"texts": ["a"], "task": "translate"}, "unknown task 'translate'"),
    ({"texts": ["a"], "dim": 33}, "dim=33"),
    ({"texts": ["a"], "batch_size": 0}, "batch_size"),
])
def test_bad_input_is_named(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.encode(**kwargs)


def test_truncated_image_bytes_are_rejected():
    with pytest.raises(ValueError, match="not an image"):
        decode_image(jpeg()[:200])


# ---------------------------------------------------------------- inputs
def test_input_builder_layout_and_truncation(tiny_model, tiny_model_dir):
    import logging

    builder = InputBuilder.from_pretrained(tiny_model_dir)
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # it does not propagate to pytest's capture
    try:
        assert len(builder.encode_one("xin chào " * 400)["input_ids"]) == builder.cfg.max_length
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    # longer than the tokenizer's limit, and cut here: its "indexing errors" warning would be false
    assert not [m for m in said if "Token indices" in m]
    row = builder.encode_one(TEXTS[3] * 20, IMAGES[2], "ocr")
    assert set(row) == {"input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    assert all(isinstance(v, np.ndarray) for v in row.values())
    assert row["input_ids"].ndim == 1 and row["pixel_values"].ndim == 2 and row["image_grid_thw"].shape == (1, 3)
    n_image = int(row["image_grid_thw"].prod()) // builder.merge**2
    assert (row["input_ids"] == builder.image_pad_id).sum() == n_image == row["mm_token_type_ids"].sum()
    assert len(row["input_ids"]) == builder.cfg.max_length  # the long text was cut, the image was not
    assert row["input_ids"][-1] == builder.eos_id and row["input_ids"][1] == builder.vision_start_id

    short = InputBuilder(tiny_model.processor, builder.cfg.model_copy(update={"max_length": n_image + 6}))
    cut = short.encode_one(TEXTS[3], IMAGES[2], "ocr")
    assert len(cut["input_ids"]) == n_image + 6 and (cut["input_ids"] == builder.image_pad_id).sum() == n_image
    tight = InputBuilder(tiny_model.processor, builder.cfg.model_copy(update={"max_length": n_image + 2}))
    with pytest.raises(ValueError, match="max_length"):
        tight.encode_one("x", IMAGES[2], "ocr")


def test_input_builder_pickles_and_pads(tiny_model):
    builder = pickle.loads(pickle.dumps(tiny_model.inputs))
    rows = [pickle.loads(pickle.dumps(builder.encode_one(t, im))) for t, im in zip(TEXTS, [IMAGES[0], None, None, IMAGES[3]])]
    for a, b in zip(rows, [tiny_model.inputs.encode_one(t, im) for t, im in zip(TEXTS, [IMAGES[0], None, None, IMAGES[3]])]):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    rows[1]["pixel_values"] = None  # how a text-only row may come back from a columnar batch
    batch = builder.pad(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["image_grid_thw"].shape == (2, 3)
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    assert (batch["input_ids"][batch["attention_mask"] == 0] == builder.pad_id).all()


def test_multi_image_row(tiny_model):
    row = tiny_model.inputs.encode_one("compare", [IMAGES[0], IMAGES[2]], "vqa_multi")
    assert row["image_grid_thw"].shape == (2, 3)
    assert (row["input_ids"] == tiny_model.inputs.vision_start_id).sum() == 2
    with torch.no_grad():
        out = tiny_model(**tiny_model.inputs.pad([row]))
    assert torch.isfinite(out.embedding).all()


def test_decode_image_converts_to_rgb():
    assert decode_image(Image.new("RGBA", (8, 8))).mode == "RGB"
    assert decode_image(Image.new("L", (8, 8))).mode == "RGB"
    assert decode_image(np.zeros((5, 6), np.uint8)).size == (6, 5)


# ---------------------------------------------------------------- pooling and projection
def _loop_attention(h: np.ndarray, m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §1 written out in float64: u_i = h_i·v, a_i = exp(u_i) M_i / Σ_j exp(u_j) M_j, c = Σ a_i h_i."""
    b, n, d = h.shape
    pooled, weights = np.zeros((b, d)), np.zeros((b, n))
    for r in range(b):
        u = [sum(float(h[r, i, k]) * float(v[k]) for k in range(d)) for i in range(n)]
        top = max(u[i] for i in range(n) if m[r, i])
        z = sum(math.exp(u[j] - top) for j in range(n) if m[r, j])
        for i in range(n):
            weights[r, i] = math.exp(u[i] - top) / z if m[r, i] else 0.0
            pooled[r] += weights[r, i] * h[r, i].astype(np.float64)
    return pooled, weights


def test_attention_pooling_matches_a_float64_loop():
    torch.manual_seed(0)
    pool = AttentionPooling(16, init_std=0.5)  # a larger std than the default makes the weights uneven
    h = torch.randn(3, 7, 16) * 3
    m = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]])  # full, right, left
    pooled, weights = pool(h, m)
    ref_pooled, ref_weights = _loop_attention(h.numpy(), m.numpy(), pool.context.detach().numpy())
    np.testing.assert_allclose(weights.detach().numpy(), ref_weights, atol=1e-6)
    np.testing.assert_allclose(pooled.detach().numpy(), ref_pooled, atol=1e-5)
    assert weights.detach()[1].max() < 1  # not degenerate: several tokens share the mass
    # bf16 hidden states still pool in float32, close to the float64 reference
    pooled16, _ = pool(h.bfloat16(), m)
    assert pooled16.dtype == torch.float32
    ref16, _ = _loop_attention(h.bfloat16().float().numpy(), m.numpy(), pool.context.detach().numpy())
    np.testing.assert_allclose(pooled16.detach().numpy(), ref16, atol=1e-4)


def test_attention_pooling_init():
    torch.manual_seed(0)
    pool = AttentionPooling(4096, init_std=0.02)
    assert abs(pool.context.std().item() - 0.02) < 1e-3 and abs(pool.context.mean().item()) < 2e-3


def test_multihead_pooling_matches_per_head_loop():
    torch.manual_seed(0)
    pool = MultiHeadAttentionPooling(16, num_heads=4, init_std=0.5)
    h = torch.randn(2, 5, 16)
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    pooled, weights = pool(h, m)
    assert weights.shape == (2, 4, 5)
    for k in range(4):
        sl = slice(4 * k, 4 * k + 4)
        ref_pooled, ref_weights = _loop_attention(h[..., sl].numpy(), m.numpy(), pool.context[k].detach().numpy())
        np.testing.assert_allclose(weights[:, k].detach().numpy(), ref_weights, atol=1e-6)
        np.testing.assert_allclose(pooled[:, sl].detach().numpy(), ref_pooled, atol=1e-5)
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadAttentionPooling(10, num_heads=4)


def test_mean_and_last_token_pooling():
    h = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    pooled, w = LastTokenPooling()(h, right)
    assert torch.equal(pooled, torch.stack([h[0, 2], h[1, 4]])) and w[0].tolist() == [0, 0, 1, 0, 0]
    pooled, _ = LastTokenPooling()(h, left)
    assert torch.equal(pooled, h[:, 4])
    pooled, w = MeanPooling()(h, right)
    torch.testing.assert_close(pooled, torch.stack([h[0, :3].mean(0), h[1].mean(0)]))
    torch.testing.assert_close(w.sum(-1), torch.ones(2))


def test_build_pooling_kinds():
    kinds = {PoolingKind.ATTENTION: AttentionPooling, PoolingKind.MEAN: MeanPooling,
             PoolingKind.LAST: LastTokenPooling, PoolingKind.MULTIHEAD: MultiHeadAttentionPooling}
    for kind, cls in kinds.items():
        assert isinstance(build_pooling(PoolingConfig(kind=kind), 64), cls)


def test_projection_formula_in_float32():
    torch.manual_seed(0)
    head = ProjectionHead(8, ProjectionConfig(out_dim=6, hidden_dim=5, matryoshka_dims=[6]))
    c = torch.randn(3, 8)
    ln = torch.nn.functional.layer_norm
    ref = ln(head.w2(torch.nn.functional.gelu(ln(head.w1(c), (5,), head.ln1.weight, head.ln1.bias))), (6,),
             head.ln2.weight, head.ln2.bias)
    torch.testing.assert_close(head(c), ref)
    head.to(torch.bfloat16)  # DeepSpeed bf16 casts every parameter; the math stays float32
    assert head(c.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="dim=7"):
        matryoshka(torch.randn(2, 6), 7)
    with pytest.raises(ValueError, match="matryoshka_dims"):
        ProjectionConfig(out_dim=64, matryoshka_dims=[128])


# ---------------------------------------------------------------- training-side helpers
def test_gradients_reach_every_component(fresh_model):
    model = fresh_model.train()
    rows = [model.inputs.encode_one(t, im, "ocr") for t, im in zip(TEXTS, IMAGES)]
    out = model(**model.inputs.pad(rows))
    (out.embedding @ torch.randn(32)).sum().backward()
    norms = {c: sum(p.grad.norm().item() ** 2 for _, p in ps if p.grad is not None) ** 0.5
             for c, ps in model.param_groups().items()}
    assert all(norms[c] > 0 for c in ("vision", "language", "pooling", "projection")), norms

    model.zero_grad(set_to_none=True)
    text_only = model(**model.inputs.pad([model.inputs.encode_one(t) for t in TEXTS]))
    text_only.embedding.sum().backward()
    # Training without an image still touches the vision tower, weighted 0 (so that every worker's
    # backward reduces the same parameters): gradients that exist and are exactly zero.
    assert all(p.grad is not None and not p.grad.any() for _, p in model.param_groups()["vision"])
    assert model.pooling.context.grad is not None and model.backbone.get_input_embeddings().weight.grad is not None


def test_param_groups_and_component_names(fresh_model):
    groups = fresh_model.param_groups()
    names = [n for ps in groups.values() for n, _ in ps]
    assert len(names) == len(set(names)) == len(list(fresh_model.parameters()))
    assert groups["pooling"] == [("pooling.context", fresh_model.pooling.context)]
    assert len(groups["projection"]) == 8 and groups["vision"] and groups["language"]
    assert component_of("module.backbone.visual.blocks.0.attn.qkv.weight") == "vision"
    assert component_of("_orig_mod.backbone.language_model.norm.weight") == "language"
    with pytest.raises(ValueError, match="no PolyEmbedder component"):
        component_of("optimizer.step")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    grads = []
    for checkpointing in (False, True):
        model = PolyEmbedder.from_pretrained(tiny_model_dir).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        batch = model.inputs.pad([model.inputs.encode_one(t, im) for t, im in zip(TEXTS[:2], IMAGES[:2])])
        model(**batch).embedding.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert model.backbone.language_model.gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_encode_restores_training_mode(fresh_model):
    fresh_model.train()
    fresh_model.encode(TEXTS[:1])
    assert fresh_model.training


# ---------------------------------------------------------------- entry points
def test_tiny_cli_is_deterministic(tiny_model, tmp_path, capsys):
    from vipoly.model.tiny import main

    main([str(tmp_path / "tiny"), "--seed", "0"])
    assert "written to" in capsys.readouterr().out
    again = PolyEmbedder.from_pretrained(tmp_path / "tiny")
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_package_exports_and_bad_backbone():
    from vipoly import EmbedOutput as E
    from vipoly import PolyEmbedder as P

    assert P is PolyEmbedder and E.__name__ == "EmbedOutput"
    with pytest.raises(ValueError, match="model.backbone '/no/such/backbone'"):
        PolyEmbedder.build(ModelConfig(backbone="/no/such/backbone"))


def test_sequences_of_images_in_other_containers(tiny_model):
    arrays = np.stack([np.asarray(Image.new("RGB", (32, 32), c)) for c in [(255, 0, 0), (0, 0, 255)]])
    ref = tiny_model.encode(images=[arrays[0], arrays[1]])
    np.testing.assert_allclose(tiny_model.encode(images=arrays), ref, atol=1e-6)  # (N, H, W, 3) batch
    np.testing.assert_allclose(tiny_model.encode(images=tuple(arrays)), ref, atol=1e-6)
    with pytest.raises(ValueError, match="different lengths"):
        tiny_model.encode(texts=["a"], images=[])


def test_many_inputs_across_windows_keep_their_order(tiny_model):
    from vipoly.model.tiny import corpus

    texts = corpus()[::5][:40]
    assert len(texts) == 40
    small = tiny_model.encode(texts, batch_size=2, show_progress=True)  # 2 windows of 32 rows
    large = tiny_model.encode(texts, batch_size=64)
    np.testing.assert_allclose(small, large, atol=1e-4, rtol=0)
    for i in (0, 17, 39):
        np.testing.assert_allclose(small[i], tiny_model.encode([texts[i]])[0], atol=1e-4, rtol=0)


def test_bf16_backbone_keeps_float32_heads(tiny_model_dir, tiny_model):
    model = PolyEmbedder.from_pretrained(tiny_model_dir, ModelConfig(dtype="bfloat16")).eval()
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    assert model.pooling.context.dtype == model.projection.w1.weight.dtype == torch.float32
    batch = model.inputs.pad([model.inputs.encode_one(t, im) for t, im in zip(TEXTS, IMAGES)])
    with torch.no_grad():
        out = model(**batch)
    assert out.embedding.dtype == out.pooled.dtype == torch.float32
    cos = (model.encode(TEXTS, IMAGES) * tiny_model.encode(TEXTS, IMAGES)).sum(1)
    assert cos.min() > 0.95, cos  # bf16 rounding of the backbone only


def test_patch_embedding_runs_as_one_gemm_with_the_same_weights(tiny_model, tiny_model_dir):
    """The loaded vision tower's Conv3d patch embedding is computed as a GEMM: same outputs and
    gradients as the convolution, same parameter, same checkpoint name."""
    import copy

    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

    from vipoly.model.backbone import LinearPatchEmbed, patch_embed_as_linear

    ours = tiny_model.backbone.visual.patch_embed
    assert type(ours) is LinearPatchEmbed
    conv = copy.deepcopy(ours)
    conv.__class__ = PatchEmbed  # the stock convolution, same weights
    assert type(copy.deepcopy(ours)) is LinearPatchEmbed and pickle.loads(pickle.dumps(ours)).__class__ is LinearPatchEmbed
    x = torch.randn(37, ours.in_channels * ours.temporal_patch_size * ours.patch_size ** 2)
    ref_x, our_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = conv(ref_x), ours(our_x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(our_x.grad, ref_x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.proj.weight.grad, conv.proj.weight.grad, atol=1e-4, rtol=1e-5)
    ours.proj.weight.grad = None  # the session model is shared
    assert "visual.patch_embed.proj.weight" in dict(tiny_model.backbone.named_parameters())
    assert patch_embed_as_linear(tiny_model.backbone)  # idempotent
    # A Conv3d that slides (stride < kernel) is not a patch projection: left as it is.
    sliding = PatchEmbed(patch_size=4, temporal_patch_size=2, in_channels=3, embed_dim=8)
    sliding.proj.stride = (1, 2, 2)
    fake = torch.nn.Module()
    fake.visual = torch.nn.Module()
    fake.visual.patch_embed = sliding
    assert not patch_embed_as_linear(fake) and type(sliding) is PatchEmbed
