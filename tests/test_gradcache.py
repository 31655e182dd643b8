"""GradCache on the tiny Qwen2-VL: cached gradients equal the full-batch gradients of every parameter
(padded and packed chunks, the DLE loss), dropout replays the same masks, and errors."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLAttention

from vipoly.losses import dle_loss
from vipoly.model import PolyEmbedder
from vipoly.train.gradcache import embed_chunk, gradcache_step

QUERIES = ["Xin chào thế giới", "Hello", "你好，世界！", "A farmer rides a bicycle to the market in Hanoi.",
           "Bác sĩ đọc sách", "We study Vietnamese every day", "老师在公园里", "Invoice no. 0123, total $45.00"]
PASSAGES = ["Chào bạn", "Hi there, how are you?", "世界你好", "Người nông dân đạp xe đến chợ.",
            "The doctor reads a book", "Chúng tôi học tiếng Việt", "The teacher is in the park", "Hóa đơn số 0123"]
TASK_IDS = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
SCORES = torch.tensor([0.9, math.nan, math.nan, math.nan, math.nan, 0.4, math.nan, math.nan])
WEIGHTS = torch.tensor([0.3, 1.2, 1.0, 1.0, 0.9])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def loss_fn(a, b):
    return dle_loss(a, b, TASK_IDS, SCORES, WEIGHTS)


def encoded(model, texts):
    return [model.inputs.encode_one(t, None, None) for t in texts]


def chunks(model, rows, size, collate):
    return [collate(rows[i:i + size]) for i in range(0, len(rows), size)]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def plain_step(model, batches_q, batches_p):
    """The reference: every chunk embedded with a graph, one loss, one backward."""
    model.zero_grad(set_to_none=True)
    a = torch.cat([embed_chunk(model, c) for c in batches_q])
    b = torch.cat([embed_chunk(model, c) for c in batches_p])
    loss, stats = loss_fn(a, b)
    loss.backward()
    return loss.detach(), stats, grads(model)


def assert_same_grads(got, want):
    """Equal up to float32 rounding, which grows with a tensor's scale (the embedding table's
    gradients reach ~10); a wrong gradient differs at the scale itself."""
    assert got.keys() == want.keys() and want
    for name, g in want.items():
        atol = 1e-6 * max(1.0, g.abs().max().item())
        torch.testing.assert_close(got[name], g, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("collate", ["pad", "pack"])
def test_cached_gradients_equal_full_batch_gradients(tiny_model_dir, collate):
    model = PolyEmbedder.from_pretrained(tiny_model_dir).train()
    collate_fn = getattr(model.inputs, collate)
    rows_q, rows_p = encoded(model, QUERIES), encoded(model, PASSAGES)
    # The reference is one padded batch of all 8 pairs; GradCache sees chunks of 3, 3, 2 and 4, 4.
    loss_ref, stats_ref, grads_ref = plain_step(model, [model.inputs.pad(rows_q)], [model.inputs.pad(rows_p)])

    model.zero_grad(set_to_none=True)
    loss, stats = gradcache_step(model, chunks(model, rows_q, 3, collate_fn), chunks(model, rows_p, 4, collate_fn),
                                 loss_fn)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.task_sum, stats_ref.task_sum, atol=1e-5, rtol=1e-5)
    assert_same_grads(grads(model), grads_ref)


def test_dropout_masks_are_replayed(tiny_model_dir):
    """With dropout on, the replay must draw the first pass's masks: then the gradients equal those
    of the same chunks embedded with a graph in the same order; without the RNG replay they do not."""
    model = PolyEmbedder.from_pretrained(tiny_model_dir).train()
    for module in model.modules():
        if isinstance(module, Qwen2VLAttention):
            module.attention_dropout = 0.3
    rows_q, rows_p = encoded(model, QUERIES), encoded(model, PASSAGES)
    cq, cp = chunks(model, rows_q, 4, model.inputs.pad), chunks(model, rows_p, 4, model.inputs.pad)

    torch.manual_seed(7)
    loss_ref, _, grads_ref = plain_step(model, cq, cp)
    after_ref = torch.rand(1)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss, _ = gradcache_step(model, cq, cp, loss_fn)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-5)
    assert_same_grads(grads(model), grads_ref)
    assert torch.equal(torch.rand(1), after_ref)  # the caller's RNG stream goes on as after one pass

    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    gradcache_step(model, cq, cp, loss_fn, capture_rng=False)
    unreplayed = grads(model)
    name = "pooling.context"
    assert not torch.allclose(unreplayed[name], grads_ref[name], atol=1e-6, rtol=1e-4)


def test_gradients_accumulate_like_backward(tiny_model_dir):
    model = PolyEmbedder.from_pretrained(tiny_model_dir).train()
    cq = chunks(model, encoded(model, QUERIES), 4, model.inputs.pack)
    cp = chunks(model, encoded(model, PASSAGES), 8, model.inputs.pack)
    model.zero_grad(set_to_none=True)
    gradcache_step(model, cq, cp, loss_fn)
    once = grads(model)
    gradcache_step(model, cq, cp, loss_fn)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, 2 * once[name], atol=1e-6, rtol=1e-5)


def test_empty_chunks_are_rejected(tiny_model):
    with pytest.raises(ValueError, match="chunks_q and chunks_p"):
        gradcache_step(tiny_model, [], [tiny_model.inputs.pad(encoded(tiny_model, ["x"]))], loss_fn)
