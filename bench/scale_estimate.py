"""Time and cost of the reference training (3 epochs over the 11.2M-sample corpus) on 4, 16 and 64
H100s, from measured single-H100 throughput plus assumptions that are all printed with the result.

    python bench/scale_estimate.py                      # the tables in docs/scale.md
    python bench/scale_estimate.py --baseline ../shared/bench/hf_baseline_h100.json --price-per-gpu-hour 4.0

The model, per GPU (one H100):
    t_side  = 1/R_img + max(0, text_tokens - 64)/R_text     an image side (448x448 -> 256 visual tokens)
            = text_tokens / R_text                          a text-only side
    t_pair  = t_query + t_positive                          one training pair = two encoder passes
    T_epoch = sum_task N_task * t_pair(task)                GPU-seconds per epoch
Data parallel on n GPUs, with B pairs per GPU per micro-batch and A micro-batches per optimizer step:
    t_step  = B * A * mean(t_pair)                          compute per optimizer step
    t_sync  = 2 (n-1)/n * G / busbw(n) * (1 - overlap)      exposed gradient all-reduce (ring), G = grad bytes
    eff(n)  = t_step / (t_step + t_sync)
    wall    = epochs * T_epoch / (n * eff(n))
    cost    = wall * n * price          (billed per GPU; "nodes $" bills whole 8-GPU nodes)
R_text and R_img are plain Hugging Face Qwen2-VL-2B numbers (bench/hf_baseline_qwen2vl.py): our own
training step replaces them once it is benchmarked on an H100 (`--r-text`, `--r-img`).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------- measured (source: the JSON below)
BASELINE_FILE = "hf_baseline_h100.json"  # /work/shared/bench/, printed by bench/hf_baseline_qwen2vl.py
MEASURED = {
    # H100 80GB HBM3, torch 2.11 + CUDA 13.0, transformers 5.17, bf16, SDPA, padded batches, AdamW.
    "B_train_text_B32_L1024_gc": {"real_tokens_per_s": 20337},  # text, gradient checkpointing (as the config)
    "D_train_img448_B12_gc": {"samples_per_s": 20.7, "L": 64},  # 448x448 image + 64 text tokens, GC
    "A_embed_text_B64_L512": {"real_tokens_per_s": 80397},  # forward only, no grad
    "C_embed_img448_B32": {"samples_per_s": 98.3},
    "params_lm_nonembed": 1310340608,
    "params_vision": 665271296,
}
EMBED_PARAMS = 151936 * 1536  # Qwen2-VL-2B token embeddings (tied): trained too, so synchronised too

# ---------------------------------------------------------------- assumed (edit here, or pass flags)
@dataclass(frozen=True)
class Task:
    name: str
    samples: float  # SPEC §5; vqa 2.5M split 1:1 like configs/qwen2vl-2b.yaml's mix
    query_tokens: int  # text tokens incl. the task prefix; ASSUMED typical lengths
    query_images: int
    pos_tokens: int
    pos_images: int


TASKS = (
    Task("text_pair", 5.6e6, 40, 0, 40, 0),  # Vietnamese/English/Chinese sentence pairs
    Task("instr", 0.6e6, 64, 0, 192, 0),  # instruction -> passage
    Task("ocr", 2.5e6, 24, 1, 160, 0),  # document image -> its text
    Task("vqa_single", 1.25e6, 48, 1, 24, 0),  # image + question -> answer
    Task("vqa_multi", 1.25e6, 192, 1, 32, 0),  # image + earlier turns -> answer
)
EPOCHS = 3
BATCH, ACCUM = 12, 10  # configs/qwen2vl-2b.yaml: per-device batch, gradient accumulation
GPUS_PER_NODE = 8  # p5.48xlarge
BUSBW_INTRA = 360e9  # B/s per GPU, NCCL all-reduce bus bandwidth over NVLink 4 (ASSUMED)
BUSBW_INTER = 35e9  # B/s per GPU across nodes: 3200 Gb/s EFA / 8 GPUs = 50 GB/s, 70% achieved (ASSUMED)
OVERLAP = 0.5  # share of the all-reduce hidden behind the last micro-batch's backward (ASSUMED)
PRICE_PER_GPU_HOUR = 6.88  # USD: p5.48xlarge on-demand us-east-1 $55.04/h / 8, list price after
#                            AWS's June 2025 P5 price cut (ASSUMED; check the current price)
JPEG_BYTES = 150e3  # stored size of one ~448px image in the Parquet rows (ASSUMED)
DECODE_IMAGES_PER_CORE_S = 44.0  # 448² JPEG → patches, one core: bench/data_pipeline.py [decode], 2026-11-26
PREFETCH_BATCHES = 4  # micro-batches in flight per Train worker (ASSUMED)


def side_seconds(tokens: int, images: int, r_text: float, r_img: float, img_text: int) -> float:
    if images:
        return images / r_img + max(0, tokens - img_text) / r_text
    return tokens / r_text


def pair_seconds(t: Task, r_text: float, r_img: float, img_text: int) -> float:
    return (side_seconds(t.query_tokens, t.query_images, r_text, r_img, img_text)
            + side_seconds(t.pos_tokens, t.pos_images, r_text, r_img, img_text))


def sync_seconds(n: int, grad_bytes: float, overlap: float, busbw_inter: float = BUSBW_INTER) -> float:
    if n == 1:
        return 0.0
    busbw = BUSBW_INTRA if n <= GPUS_PER_NODE else busbw_inter
    return 2 * (n - 1) / n * grad_bytes / busbw * (1 - overlap)


def load_measured(path: str | None) -> dict:
    if not path:
        return MEASURED
    data = json.loads(Path(path).read_text())
    return {k: data[k] for k in MEASURED}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help=f"read the measured numbers from this {BASELINE_FILE}")
    p.add_argument("--r-text", type=float, help="override: training text tokens/s per GPU")
    p.add_argument("--r-img", type=float, help="override: training image(+64 tokens) samples/s per GPU")
    p.add_argument("--price-per-gpu-hour", type=float, default=PRICE_PER_GPU_HOUR)
    p.add_argument("--gpus", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--busbw-inter", type=float, default=BUSBW_INTER,
                   help="bytes/s per GPU across nodes (1.56e9 = one 100 Gb/s NIC per 8 GPUs, no EFA)")
    p.add_argument("--decode-images-per-core-s", type=float, default=DECODE_IMAGES_PER_CORE_S)
    a = p.parse_args(argv)

    m = load_measured(a.baseline)
    r_text = a.r_text or m["B_train_text_B32_L1024_gc"]["real_tokens_per_s"]
    r_img = a.r_img or m["D_train_img448_B12_gc"]["samples_per_s"]
    img_text = m["D_train_img448_B12_gc"]["L"]
    params = m["params_lm_nonembed"] + m["params_vision"] + EMBED_PARAMS
    grad_bytes = 2 * params  # bf16 gradients (ZeRO-2 moves the same volume: reduce-scatter + all-gather)

    print(f"inputs: R_text={r_text:.0f} tok/s, R_img={r_img} img-samples/s (source: "
          f"{a.baseline or BASELINE_FILE + ' (copied into MEASURED)'}); params={params / 1e9:.2f}B; "
          f"gradient all-reduce {grad_bytes / 1e9:.2f} GB/step; busbw {BUSBW_INTRA / 1e9:.0f} GB/s in a node, "
          f"{a.busbw_inter / 1e9:.2f} GB/s across; overlap {OVERLAP:.0%}; ${a.price_per_gpu_hour}/GPU-h\n")

    print("per-task cost on one H100 (assumed lengths; image side = 448x448 + up to 64 text tokens)")
    print(f"{'task':<11}{'samples':>9}{'q tok':>7}{'q img':>6}{'p tok':>7}{'ms/pair':>9}{'GPU-h/epoch':>13}{'share':>7}")
    per_task = {t.name: t.samples * pair_seconds(t, r_text, r_img, img_text) for t in TASKS}
    t_epoch = sum(per_task.values())
    n_samples = sum(t.samples for t in TASKS)
    for t in TASKS:
        ms = 1e3 * pair_seconds(t, r_text, r_img, img_text)
        print(f"{t.name:<11}{t.samples / 1e6:>8.2f}M{t.query_tokens:>7}{t.query_images:>6}{t.pos_tokens:>7}"
              f"{ms:>9.1f}{per_task[t.name] / 3600:>13.1f}{per_task[t.name] / t_epoch:>7.0%}")
    mean_pair = t_epoch / n_samples
    print(f"{'all':<11}{n_samples / 1e6:>8.2f}M{'':>27}{1e3 * mean_pair:>9.1f}{t_epoch / 3600:>13.1f}"
          f"  -> {EPOCHS} epochs = {EPOCHS * t_epoch / 3600:.0f} H100-hours at 100% scaling\n")

    for accum, label in ((ACCUM, f"as configured: batch {BATCH} x accumulation {ACCUM} per GPU"),
                         (1, f"no accumulation: batch {BATCH} per GPU (global batch 12n, most sync per sample)")):
        print(f"{label}")
        print(f"{'GPUs':>5}{'nodes':>6}{'global':>8}{'steps':>9}{'step s':>8}{'sync s':>8}{'eff':>6}"
              f"{'wall h':>8}{'days':>6}{'GPU-h':>7}{'cost $':>9}{'nodes $':>9}")
        for n in a.gpus:
            t_step = BATCH * accum * mean_pair
            t_sync = sync_seconds(n, grad_bytes, OVERLAP, a.busbw_inter)
            eff = t_step / (t_step + t_sync)
            wall = EPOCHS * t_epoch / (n * eff)
            nodes = math.ceil(n / GPUS_PER_NODE)
            billed = nodes * GPUS_PER_NODE
            steps = EPOCHS * n_samples / (BATCH * accum * n)
            hours = wall / 3600
            print(f"{n:>5}{nodes:>6}{BATCH * accum * n:>8}{steps:>9.0f}{t_step:>8.2f}{t_sync:>8.3f}{eff:>6.1%}"
                  f"{hours:>8.1f}{wall / 86400:>6.1f}{hours * n:>7.0f}{hours * n * a.price_per_gpu_hour:>9,.0f}"
                  f"{hours * billed * a.price_per_gpu_hour:>9,.0f}")
        print()

    # Input side: what each GPU consumes, and what that asks of CPUs and the object store.
    images = sum(t.samples * (t.query_images + t.pos_images) for t in TASKS)
    tokens = sum(t.samples * (t.query_tokens + t.pos_tokens) for t in TASKS)
    img_rate, tok_rate = images / t_epoch, tokens / t_epoch
    print(f"input per GPU at full speed: {img_rate:.1f} images/s to decode, {tok_rate:,.0f} text tokens/s to "
          f"tokenize, {n_samples / t_epoch:.1f} pairs/s")
    if a.decode_images_per_core_s:
        print(f"CPU cores per GPU for image decoding: {img_rate / a.decode_images_per_core_s:.2f}")
    else:
        print("CPU cores per GPU for image decoding: TODO (needs images/s per core from bench/data_pipeline.py)")
    for n in a.gpus:
        print(f"  {n:>3} GPUs read {n * n_samples / t_epoch:,.0f} pairs/s = "
              f"{n * img_rate * JPEG_BYTES / 1e6:,.0f} MB/s of image bytes from shared storage")
    pix_u8 = 448 * 448 * 3  # decoded RGB, uint8
    patches_f32 = (448 // 14) ** 2 * 2 * 3 * 14 * 14 * 4  # Qwen2-VL patches (temporal x2), float32
    per_batch_img = BATCH * (images / n_samples)
    print(f"object store per GPU, {PREFETCH_BATCHES} micro-batches in flight: "
          f"{PREFETCH_BATCHES * per_batch_img * JPEG_BYTES / 1e6:.0f} MB as JPEG bytes, "
          f"{PREFETCH_BATCHES * per_batch_img * pix_u8 / 1e6:.0f} MB as uint8 pixels, "
          f"{PREFETCH_BATCHES * per_batch_img * patches_f32 / 1e6:.0f} MB as float32 patches "
          f"(worst case, every pair with an image: x{1 / (images / n_samples):.1f})")
    img_s, tok_s = m["C_embed_img448_B32"]["samples_per_s"], m["A_embed_text_B64_L512"]["real_tokens_per_s"]
    print(f"batch embedding (forward only) per H100: {img_s} images/s, {tok_s:,} text tokens/s -> "
          f"10M images = {1e7 / img_s / 3600:.1f} H100-h, 10M passages of 256 tokens = "
          f"{1e7 * 256 / tok_s / 3600:.1f} H100-h; {GPUS_PER_NODE} actors on one node need "
          f"{GPUS_PER_NODE * img_s:.0f} decoded images/s")


if __name__ == "__main__":
    main()
