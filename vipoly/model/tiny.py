"""A tiny random PolyEmbedder with the Qwen2-VL architecture, built offline in about a second.

    python -m vipoly.model.tiny OUT_DIR [--seed 0]

Tests and the CPU demo use it in place of Qwen2-VL-2B: every code path (M-RoPE, vision tower,
image tokens, pooling, projection, save/load) is the real one, only the sizes are small:

    language model  hidden 64, 2 layers, 4 heads (2 KV heads, head_dim 16), MLP 128,
                    mrope_section (2, 3, 3) (sums to head_dim / 2, as M-RoPE requires)
    vision tower    2 blocks, width 32, 2 heads, patch 8, 2×2 merge, output 64 (= text hidden size)
    images          resized to 16²..64² pixels → at most 16 image tokens each
    heads           attention pooling over 64, projection 64 → 32 (Matryoshka 32/16/8)
    tokenizer       byte-level BPE (≤ 1024 tokens) trained here on the Vietnamese / English /
                    Chinese sentences below, Qwen2's pre-tokenizer regex and NFC, Qwen2-VL's special
                    tokens, and the five task prefixes as single tokens

Byte-level BPE can spell any text, so nothing is ever unknown; the sentences only decide which
pieces are whole tokens. The weights are random: the tiny model shows the pipeline's mechanics, not
retrieval quality.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLModel
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from vipoly.model.config import ModelConfig, PoolingConfig, ProjectionConfig
from vipoly.model.backbone import add_task_tokens
from vipoly.model.processor import ImageProcessor, ImageTextProcessor
from vipoly.model.embedder import PolyEmbedder
from vipoly.tasks import TASKS, prefix

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
VOCAB_SIZE = 1024
PATCH, MERGE, TEMPORAL = 8, 2, 2

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
              patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
MODEL = ModelConfig(
    backbone="vipoly-tiny", pooling=PoolingConfig(), max_length=256,
    projection=ProjectionConfig(out_dim=32, matryoshka_dims=[32, 16, 8]),
    image_min_pixels=16 * 16, image_max_pixels=64 * 64)

# Subject × action × circumstance in each language: a few hundred everyday sentences.
_VI = (["Tôi", "Chúng tôi", "Cô giáo", "Bác sĩ", "Học sinh", "Mẹ tôi", "Anh ấy", "Người nông dân"],
       ["đọc một cuốn sách hay", "uống cà phê sữa đá", "đi chợ mua rau", "viết thư cho bạn", "học tiếng Anh",
        "xem bản đồ thành phố", "chụp ảnh hoa sen", "trả lời câu hỏi", "nấu phở bò", "đạp xe đến trường"],
       ["vào buổi sáng", "ở Hà Nội", "trong công viên", "hôm qua", "mỗi ngày", "tại Thành phố Hồ Chí Minh"])
_EN = (["I", "We", "The teacher", "The doctor", "A student", "My mother", "He", "The farmer"],
       ["read a good book", "drink iced coffee", "go to the market", "write a letter to a friend",
        "study Vietnamese", "look at the city map", "take a photo of the lotus", "answer the question",
        "cook beef noodle soup", "ride a bicycle to school"],
       ["in the morning", "in Hanoi", "in the park", "yesterday", "every day", "in Ho Chi Minh City"])
_ZH = (["我", "我们", "老师", "医生", "学生", "我妈妈", "他", "农民"],
       ["读一本好书", "喝冰咖啡", "去市场买菜", "给朋友写信", "学习越南语", "看城市地图", "拍荷花的照片", "回答问题",
        "做牛肉河粉", "骑自行车去学校"],
       ["早上", "在河内", "在公园里", "昨天", "每天", "在胡志明市"])
_EXTRA = ["Câu hỏi: Bức ảnh này cho thấy gì? Trả lời: Một con mèo trên bàn.",
          "Question: What does this image show? Answer: A cat on a table.",
          "问题：这张图片显示了什么？回答：桌子上有一只猫。",
          "Hóa đơn số 0123, tổng cộng 45.000 đồng, ngày 12/03/2024.",
          "Invoice no. 0123, total $45.00, dated 2024-03-12.",
          "发票号码0123，合计45元，日期2024年3月12日。",
          "Hãy tìm đoạn văn trả lời câu hỏi sau.", "Find the passage that answers the following question.",
          "请找出回答以下问题的段落。"]


def corpus() -> list[str]:
    """The sentences the tiny tokenizer learns its merges from."""
    out = list(_EXTRA)
    for subjects, actions, circumstances in (_VI, _EN):
        for (i, s), a in itertools.product(enumerate(subjects), actions):
            out.append(f"{s} {a} {circumstances[(i + len(a)) % len(circumstances)]}.")
    subjects, actions, circumstances = _ZH
    for (i, s), a in itertools.product(enumerate(subjects), actions):
        out.append(f"{s}{circumstances[(i + len(a)) % len(circumstances)]}{a}。")
    return out


def train_tokenizer(sentences: list[str]) -> Qwen2Tokenizer:
    """Byte-level BPE with Qwen2's normaliser and pre-tokenizer, wrapped as a Qwen2Tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(sentences, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, model_max_length=MODEL.max_length)
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    return tokenizer


def build_tiny(out_dir: str | Path, seed: int = 0, text: dict | None = None, vision: dict | None = None,
               heads: ModelConfig | None = None) -> Path:
    """Build, save and return `out_dir`, loadable with `PolyEmbedder.from_pretrained(out_dir)`.
    `text`, `vision`: fields of the text and vision configs to set over TEXT and VISION (a larger
    model of the same architecture, for benchmarks). `heads`: a run's model config, whose pooling
    and projection the saved heads take (so that the run loads them rather than starting fresh)."""
    tokenizer = train_tokenizer(corpus())
    processor = ImageTextProcessor(
        image_processor=ImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                       size={"shortest_edge": MODEL.image_min_pixels,
                                             "longest_edge": MODEL.image_max_pixels}),
        tokenizer=tokenizer)
    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)))
    config = Qwen2VLConfig(
        text_config=dict(TEXT, **(text or {}), vocab_size=len(tokenizer) + len(TASKS), bos_token_id=None,
                         eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(VISION, **(vision or {})), image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG is left as it was
        torch.manual_seed(seed)
        backbone = Qwen2VLModel._from_config(config, attn_implementation="sdpa")
        add_task_tokens(backbone, processor, [prefix(t).strip() for t in TASKS])
        cfg = MODEL if heads is None else MODEL.model_copy(update={"pooling": heads.pooling,
                                                                   "projection": heads.projection})
        model = PolyEmbedder(backbone, processor, cfg, name="vipoly-tiny")
    return model.save_pretrained(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny(args.out_dir, args.seed)
    n = sum(p.numel() for p in PolyEmbedder.from_pretrained(out).parameters())
    print(f"tiny PolyEmbedder ({n:,} parameters) written to {out}")


if __name__ == "__main__":
    main()
