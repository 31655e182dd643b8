"""Packed sequences on the tiny Qwen2-VL: positions against transformers' own rope index, packed
vs padded embeddings (text, images, mixed, every pooling kind, both attention kinds), the DLE loss
and every parameter's gradient, segment arithmetic against plain loops, and errors."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vipoly.model.config import ModelConfig, PoolingConfig, PoolingKind
from vipoly.losses import dle_loss
from vipoly.model import PolyEmbedder, build_pooling
from vipoly.model import packing
from vipoly.model.backbone import resolve_attn_implementation
from vipoly.model.packing import (VARLEN, VISION_VARLEN, attention_inputs, mrope_positions, pool_packed,
                                  segment_softmax, unpack)
from vipoly.tasks import TASKS

TEXTS = ["Xin chào thế giới, hôm nay trời đẹp quá.", "Hello", "你好，世界！今天天气很好。",
         "A much longer English sentence about a farmer who rides a bicycle to the market in Hanoi every day.",
         "Bác sĩ đọc một cuốn sách hay vào buổi sáng."]


def png(color, size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def noise(size, seed) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# Different sizes → different grids (including non-square ones, where h ≠ w moves the text after).
IMAGES = [png((255, 0, 0), (40, 30)), noise((64, 64), 1), noise((17, 90), 2), png((0, 0, 255), (90, 20)), None]
KINDS = {"text": (TEXTS, [None] * 5), "image": ([None] * 4 + [TEXTS[4]], IMAGES[:4] + [noise((30, 30), 3)]),
         "mixed": (TEXTS, IMAGES)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is too small for intra-op threads (see test_model.py)
    yield
    torch.set_num_threads(before)


def rows_of(model, kind, task="vqa_single"):
    texts, images = KINDS[kind]
    return [model.inputs.encode_one(t, im, task) for t, im in zip(texts, images)]


# ---------------------------------------------------------------- layout and positions
@pytest.mark.parametrize("kind", ["text", "image", "mixed"])
def test_positions_equal_transformers_rope_index(tiny_model, kind):
    rows = rows_of(tiny_model, kind)
    padded, packed = tiny_model.inputs.pad(rows), tiny_model.inputs.pack(rows)
    cu = packed["cu_seqlens"].tolist()
    if "image_grid_thw" in padded:
        ref, _ = tiny_model.backbone.get_rope_index(padded["input_ids"], padded["mm_token_type_ids"],
                                                    padded["image_grid_thw"], attention_mask=padded["attention_mask"])
    else:  # text only: transformers uses 0…N−1 on every axis
        ref = torch.arange(padded["input_ids"].shape[1]).expand(3, len(rows), -1)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert cu[i + 1] - cu[i] == n
        got = packed["position_ids"][:, 0, cu[i]:cu[i + 1]]
        assert torch.equal(got[0], torch.arange(n))  # row 0: text positions restart per document
        assert torch.equal(got[1:], ref[:, i, :n]), f"row {i}"


def test_multi_image_row_positions(tiny_model):
    row = tiny_model.inputs.encode_one("so sánh hai ảnh", [IMAGES[0], IMAGES[2]], "vqa_multi")
    ref, _ = tiny_model.backbone.get_rope_index(torch.as_tensor(row["input_ids"])[None],
                                                torch.as_tensor(row["mm_token_type_ids"])[None],
                                                torch.as_tensor(row["image_grid_thw"]))
    got = mrope_positions(row["input_ids"], row["mm_token_type_ids"], row["image_grid_thw"], tiny_model.inputs.merge)
    np.testing.assert_array_equal(got, ref[:, 0].numpy())
    assert not np.array_equal(got[1], got[2])  # a non-square grid: the h and w axes differ


def test_pack_layout(tiny_model):
    rows = rows_of(tiny_model, "mixed")
    packed, padded = tiny_model.inputs.pack(rows), tiny_model.inputs.pad(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    total = sum(lengths)
    assert packed["input_ids"].shape == packed["mm_token_type_ids"].shape == packed["seq_ids"].shape == (1, total)
    assert packed["position_ids"].shape == (4, 1, total) and packed["cu_seqlens"].dtype == torch.int32
    assert packed["cu_seqlens"].tolist() == [0, *np.cumsum(lengths).tolist()]
    assert packed["seq_ids"][0].tolist() == sum(([i] * n for i, n in enumerate(lengths)), [])
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][padded["attention_mask"].bool()])
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    assert torch.equal(packed["image_grid_thw"], padded["image_grid_thw"])
    assert "pixel_values" not in tiny_model.inputs.pack(rows_of(tiny_model, "text"))


# ---------------------------------------------------------------- packed = padded
def _pair(model, rows):
    with torch.no_grad():
        return model(**model.inputs.pad(rows)), model(**model.inputs.pack(rows))


@pytest.mark.parametrize("kind", ["text", "image", "mixed"])
def test_packed_embeddings_equal_padded(tiny_model, kind):
    rows = rows_of(tiny_model, kind)
    padded, packed = _pair(tiny_model, rows)
    assert packed.embedding.shape == padded.embedding.shape == (len(rows), tiny_model.embedding_dim)
    torch.testing.assert_close(packed.embedding, padded.embedding, atol=1e-4, rtol=0)
    torch.testing.assert_close(packed.pooled, padded.pooled, atol=1e-4, rtol=0)
    torch.testing.assert_close(packed.pooling_weights, padded.pooling_weights, atol=1e-5, rtol=0)
    assert torch.equal(packed.attention_mask, padded.attention_mask)
    # and each document's vector is the one it gets alone: nothing leaks across documents
    alone = torch.cat([_pair(tiny_model, [r])[1].embedding for r in rows])
    torch.testing.assert_close(packed.embedding, alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", list(PoolingKind))
def test_every_pooling_kind_packs(tiny_model_dir, kind):
    model = PolyEmbedder.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    model.pooling = build_pooling(PoolingConfig(kind=kind, init_std=0.5), model.hidden_size)  # uneven weights
    padded, packed = _pair(model, rows_of(model, "mixed"))
    torch.testing.assert_close(packed.embedding, padded.embedding, atol=1e-4, rtol=0)
    assert packed.pooling_weights.shape == padded.pooling_weights.shape
    torch.testing.assert_close(packed.pooling_weights, padded.pooling_weights, atol=1e-5, rtol=0)


def test_encode_packed_equals_padded(tiny_model):
    texts, images = KINDS["mixed"]
    packed = tiny_model.encode(texts, images, task="ocr", batch_size=3, packed=True)
    padded = tiny_model.encode(texts, images, task="ocr", batch_size=3, packed=False)
    np.testing.assert_allclose(packed, padded, atol=1e-4, rtol=0)


def _loss_and_grads(model, rows_q, rows_p, collate, device="cpu"):
    model.zero_grad(set_to_none=True)
    a = model(**collate(rows_q)).embedding
    b = model(**collate(rows_p)).embedding
    task_ids = torch.tensor([0, 1, 2, 3, 4], device=device)
    scores = torch.tensor([0.8, math.nan, math.nan, math.nan, math.nan], device=device)
    loss, stats = dle_loss(a, b, task_ids, scores, torch.tensor([0.3, 1.2, 1.0, 1.0, 0.9], device=device))
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", VARLEN])
def test_dle_loss_and_gradients_equal_padded(tiny_model_dir, attention):
    model = PolyEmbedder.from_pretrained(tiny_model_dir).train()
    if attention == VARLEN:  # on CPU this runs the per-document reference behind the same plumbing
        model.use_varlen_attention()
    rows_q = [model.inputs.encode_one(t, im, task) for t, im, task in zip(*KINDS["mixed"], TASKS)]
    rows_p = [model.inputs.encode_one(t, None, task) for t, task in zip(reversed(TEXTS), TASKS)]
    loss_pad, stats_pad, grads_pad = _loss_and_grads(model, rows_q, rows_p, model.inputs.pad)
    loss_pack, stats_pack, grads_pack = _loss_and_grads(model, rows_q, rows_p, model.inputs.pack)
    torch.testing.assert_close(loss_pack, loss_pad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats_pack.task_sum, stats_pad.task_sum, atol=1e-5, rtol=1e-5)
    assert grads_pack.keys() == grads_pad.keys()
    assert {n.split(".")[1] for n in grads_pad if n.startswith("backbone.")} >= {"visual", "language_model"}
    for name, g in grads_pad.items():
        torch.testing.assert_close(grads_pack[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_varlen_attention_keeps_padded_batches_on_sdpa_and_runs_images_in_one_call(tiny_model_dir, tiny_model,
                                                                                     monkeypatch):
    model = PolyEmbedder.from_pretrained(tiny_model_dir).eval()
    model.use_varlen_attention()
    assert model.backbone.language_model.config._attn_implementation == VARLEN
    assert model.backbone.visual.config._attn_implementation == VISION_VARLEN
    assert model.packs_by_default and not tiny_model.packs_by_default
    calls = []
    reference_kernel = packing._varlen_reference

    def spy(q, k, v, cu, scale, causal):
        calls.append((causal, len(cu) - 1))
        return reference_kernel(q, k, v, cu, scale, causal)

    monkeypatch.setattr(packing, "_varlen_reference", spy)
    for kind in ("text", "mixed"):
        rows = rows_of(model, kind)
        reference, _ = _pair(tiny_model, rows)
        padded, packed = _pair(model, rows)
        torch.testing.assert_close(padded.embedding, reference.embedding, atol=1e-6, rtol=0)
        torch.testing.assert_close(packed.embedding, reference.embedding, atol=1e-4, rtol=0)
    n_images = sum(len(r["image_grid_thw"]) for r in rows_of(model, "mixed") if "image_grid_thw" in r)
    layers = model.backbone.config.vision_config.depth
    # every image of a batch in one non-causal call per vision layer (padded and packed batches alike)
    assert n_images > 1 and calls.count((False, n_images)) == 2 * layers
    assert all(n == n_images for causal, n in calls if not causal)


def test_varlen_attention_from_the_config(tiny_model_dir, tiny_model):
    model = PolyEmbedder.from_pretrained(tiny_model_dir, ModelConfig(attn_implementation=VARLEN)).eval()
    assert model.backbone.language_model.config._attn_implementation == VARLEN
    assert model.backbone.visual.config._attn_implementation == VISION_VARLEN
    texts, images = KINDS["mixed"]
    np.testing.assert_allclose(model.encode(texts, images), tiny_model.encode(texts, images, packed=False), atol=1e-4)
    assert resolve_attn_implementation(VARLEN) == VARLEN
    if not torch.cuda.is_available():
        assert resolve_attn_implementation("auto") == "sdpa"


def test_compiled_layers_give_the_same_embeddings_and_names(tiny_model_dir, tiny_model):
    model = PolyEmbedder.from_pretrained(tiny_model_dir, ModelConfig(attn_implementation=VARLEN)).eval()
    names = [n for n, _ in model.named_parameters()]
    model.compile_layers()
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints load either way
    texts, images = KINDS["mixed"]
    np.testing.assert_allclose(model.encode(texts, images), tiny_model.encode(texts, images, packed=False), atol=1e-4)



def test_compiled_layers_hold_lora_adapters(tiny_model_dir):
    """train.compile with model.lora (the reference run's config plus adapters): the compiled layers
    run the adapters (B made non-zero, as after training) and back-propagate into them only."""
    from vipoly.model.config import LoraConfig

    torch.manual_seed(0)
    model = PolyEmbedder.from_pretrained(tiny_model_dir, ModelConfig(attn_implementation=VARLEN))
    model.add_lora(LoraConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    texts, images = KINDS["mixed"]
    eager = model.encode(texts, images)
    names = [n for n, _ in model.named_parameters()]
    model.compile_layers()
    assert [n for n, _ in model.named_parameters()] == names
    np.testing.assert_allclose(model.encode(texts, images), eager, atol=1e-4)
    model.train()
    batch = model.collate([model._prepare(i, t, None, "instr") for i, t in enumerate(texts) if t])
    model(**batch).embedding.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("lora_A" in n for n in grads) and not any("base_layer" in n for n in grads)


# ---------------------------------------------------------------- segment arithmetic
def test_segment_softmax_and_pooling_match_loops():
    torch.manual_seed(0)
    lengths = [3, 1, 6, 2]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    seq = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    scores = torch.randn(12) * 30  # large: the per-document max must keep exp finite
    got = segment_softmax(scores, seq, 4)
    for s, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        u = scores[start:end].double()
        torch.testing.assert_close(got[start:end].double(), torch.softmax(u, 0), atol=1e-6, rtol=0)
    two_heads = segment_softmax(torch.stack([scores, -scores], 1), seq, 4)
    torch.testing.assert_close(two_heads[:, 0], got)

    hidden = torch.randn(12, 8)
    for kind in PoolingKind:
        pool = build_pooling(PoolingConfig(kind=kind, init_std=0.5, num_heads=2), 8)
        pooled, weights = pool_packed(pool, hidden, seq, cu)
        padded, mask = unpack(hidden, seq, cu)
        ref, ref_weights = pool(padded, mask)
        torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=0, msg=str(kind))
        w, _ = unpack(weights, seq, cu)
        torch.testing.assert_close(w.transpose(1, 2) if w.dim() == 3 else w, ref_weights, atol=1e-6, rtol=0)


def test_unpack_round_trip():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    seq = torch.tensor([0, 0, 1, 1, 1])
    values = torch.arange(5.0)
    out, mask = unpack(values, seq, cu)
    assert out.tolist() == [[0, 1, 0], [2, 3, 4]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert torch.equal(out[mask.bool()], values)


# ---------------------------------------------------------------- errors
def test_bad_packed_input_is_named(tiny_model):
    builder = tiny_model.inputs
    with pytest.raises(ValueError, match="no rows"):
        builder.pack([])
    row = builder.encode_one("x", IMAGES[0])
    bad = dict(row, image_grid_thw=row["image_grid_thw"] * np.array([[1, 2, 1]]))
    with pytest.raises(ValueError, match=r"row 1: an image run of \d+ tokens does not match"):
        builder.pack([builder.encode_one("ok"), bad])
    with pytest.raises(ValueError, match="more <\\|image_pad\\|> runs"):
        builder.pack([dict(row, image_grid_thw=np.zeros((0, 3), np.int64))])
    packed = builder.pack([builder.encode_one("ok")])
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(input_ids=packed["input_ids"])
    with pytest.raises(ValueError, match="position_ids must be"):
        tiny_model.forward_packed(packed["input_ids"], packed["position_ids"][1:], packed["cu_seqlens"])


# ---------------------------------------------------------------- on a GPU (pytest -m gpu)
@pytest.mark.gpu
@pytest.mark.parametrize("attention", [VARLEN, "flash_attention_2"])
def test_varlen_kernels_on_gpu_match_padded_sdpa(tiny_model_dir, attention):
    """The real kernels in bf16: packed embeddings and gradients against padded SDPA."""
    import importlib.util

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn is not installed")
    model = PolyEmbedder.from_pretrained(tiny_model_dir).to("cuda", torch.bfloat16).train()
    rows_q = [model.inputs.encode_one(t, im, task) for t, im, task in zip(*KINDS["mixed"], TASKS)]
    rows_p = [model.inputs.encode_one(t, None, task) for t, task in zip(reversed(TEXTS), TASKS)]
    on_gpu = lambda collate: lambda rows: {k: v.cuda() for k, v in collate(rows).items()}  # noqa: E731
    loss_pad, _, grads_pad = _loss_and_grads(model, rows_q, rows_p, on_gpu(model.inputs.pad), device="cuda")
    if attention == VARLEN:
        model.use_varlen_attention()
    else:
        model.backbone.set_attn_implementation(attention)
    loss_pack, _, grads_pack = _loss_and_grads(model, rows_q, rows_p, on_gpu(model.inputs.pack), device="cuda")
    torch.testing.assert_close(loss_pack, loss_pad, atol=2e-2, rtol=2e-2)
    flat = lambda g: torch.cat([x.float().flatten() for x in g.values()])  # noqa: E731
    assert F.cosine_similarity(flat(grads_pack), flat(grads_pad), dim=0) > 0.99


def test_dense_attention_equals_per_document_attention():
    """Equal-length documents (a vision batch of equal images) go through one batched SDPA call;
    it computes what per-document attention computes."""
    from vipoly.model.packing import _varlen_reference, dense_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3 * 20, 4, 8) for _ in range(3))
    cu = torch.tensor([0, 20, 40, 60], dtype=torch.int32)
    torch.testing.assert_close(dense_attention(q, k, v, 3, 0.3), _varlen_reference(q, k, v, cu, 0.3, False))


@pytest.mark.gpu
def test_dense_vision_attention_on_gpu_matches_varlen():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from torch.nn.attention.varlen import varlen_attn

    from vipoly.model.packing import varlen_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, 4 * 256, 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.arange(0, 4 * 256 + 1, 256, device="cuda", dtype=torch.int32)
    module = torch.nn.Module()
    module.is_causal = False
    out, _ = varlen_attention_forward(module, q, k, v, None, scaling=80 ** -0.5, cu_seq_lens_q=cu, max_length_q=256)
    flat = [x[0].transpose(0, 1).contiguous() for x in (q, k, v)]
    ref = varlen_attn(*flat, cu, cu, 256, 256, scale=80 ** -0.5)
    torch.testing.assert_close(out[0], ref, atol=2e-2, rtol=2e-2)
