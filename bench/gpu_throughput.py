"""Plain Hugging Face Qwen2-VL-2B vs vipoly's training step and embedding path, same card, same inputs.

    OUT=/some/dir python bench/gpu_throughput.py --quick      # < 4 min on an H100, model build included
    python bench/gpu_throughput.py [--compile] [--attn auto|sdpa|flash_attention_2|vipoly_varlen]
    TINY=1 python bench/gpu_throughput.py                    # CPU smoke run of both paths, tiny config

Both paths share one random-init model with the published Qwen2-VL-2B architecture (no download):
- baseline: `Qwen2VLModel` on right-padded batches (lengths uniform in [L/4, L], ≈ 62% real
  tokens), SDPA, bf16 weights, mean pooling + InfoNCE, AdamW: shared/bench/hf_baseline_qwen2vl.py,
  whose H100 numbers are in shared/bench/hf_baseline_h100.json;
- ours: the same documents packed into one row (no padding, `InputBuilder.pack` layout) through
  `PolyEmbedder` (attention pooling + projection in float32, InfoNCE on the embeddings), varlen
  FlashAttention (the flash_attn package where importable, else PyTorch's own), fused AdamW;
  optionally gradient checkpointing (`--gc`: on every training workload; the baseline's
  checkpointed workloads are also run without it) and `torch.compile` of the decoder layers and
  vision blocks (`PolyEmbedder.compile_layers`, what `train.compile` and `embed --compile` turn on).
Model FLOPs are 6N per trained and 2N per embedded real token (N: 1.31B language, non-embedding,
+ 0.67B vision parameters per patch), as in the baseline, so TFLOP/s ratios are speed ratios.
Prints one table (tokens/s, samples/s, TFLOP/s, fraction of the bf16 matmul rate measured in the
same run, peak memory, ratio to the baseline) and writes gpu_throughput.json to $OUT when set.
Needs torch ≥ 2.9 (varlen attention) and transformers ≥ 5.17 on the GPU; runs anywhere with TINY=1.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import transformers  # noqa: E402
from transformers import Qwen2VLConfig, Qwen2VLModel  # noqa: E402

from vipoly.model.config import ModelConfig, PoolingConfig, ProjectionConfig  # noqa: E402
from vipoly.losses import infonce  # noqa: E402
from vipoly.model.backbone import patch_embed_as_linear  # noqa: E402
from vipoly.model.processor import ImageProcessor, ImageTextProcessor  # noqa: E402
from vipoly.model.embedder import PolyEmbedder  # noqa: E402
from vipoly.model.packing import VARLEN, pack_rows, register_varlen_attention, varlen_available  # noqa: E402
from vipoly.model.tiny import corpus, train_tokenizer  # noqa: E402

TINY = os.environ.get("TINY") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not TINY else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
MERGE, PATCH = 2, 14

if TINY:  # the baseline script's tiny config
    TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1100, max_position_embeddings=4096, bos_token_id=None,
                eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    VISION = dict(depth=2, embed_dim=32, num_heads=4, hidden_size=64, mlp_ratio=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3)
    IMG_TOK = 999
else:  # Qwen2-VL-2B-Instruct's published config
    TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=True)
    VISION = dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536, mlp_ratio=4, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3)
    IMG_TOK = 151655
TEXT_VOCAB = IMG_TOK - 10  # random text ids stay clear of the vision special tokens


@dataclass
class Workload:
    name: str
    train: bool
    batch: int
    length: int  # text tokens (maximum for text-only workloads)
    image: int | None = None  # image side in pixels
    gc: bool = False  # the baseline checkpoints this one


FULL = [Workload("A_embed_text_B64_L512", False, 64, 512), Workload("A_embed_text_B16_L2048", False, 16, 2048),
        Workload("B_train_text_B16_L512", True, 16, 512), Workload("B_train_text_B32_L1024_gc", True, 32, 1024, gc=True),
        Workload("C_embed_img448_B32", False, 32, 64, 448), Workload("D_train_img448_B12_gc", True, 12, 64, 448, gc=True)]
QUICK = [FULL[0], FULL[2], FULL[4], FULL[5]]
TINY_SET = [Workload("A_embed_text", False, 4, 32), Workload("B_train_text", True, 4, 32),
            Workload("C_embed_img", False, 2, 16, 56), Workload("D_train_img", True, 2, 16, 56, gc=True)]


# ---------------------------------------------------------------- build
def build() -> tuple[PolyEmbedder, dict]:
    """One random-init backbone (bf16 on GPU) inside a PolyEmbedder whose heads are float32."""
    config = Qwen2VLConfig(text_config=TEXT, vision_config=VISION, image_token_id=IMG_TOK,
                           video_token_id=IMG_TOK - 1, vision_start_token_id=IMG_TOK - 3,
                           vision_end_token_id=IMG_TOK - 2)
    config._attn_implementation = "sdpa"
    t0 = time.time()
    with torch.device(DEVICE):
        backbone = Qwen2VLModel(config).to(DTYPE)
    build_s = time.time() - t0
    # The processor only has to agree with the vision config; no text is tokenised here.
    processor = ImageTextProcessor(image_processor=ImageProcessor(patch_size=PATCH, merge_size=MERGE,
                                                                  temporal_patch_size=2),
                                   tokenizer=train_tokenizer(corpus()))
    cfg = ModelConfig(backbone="random-init", pooling=PoolingConfig(),
                      projection=ProjectionConfig(out_dim=32 if TINY else 1024,
                                                  matryoshka_dims=[32] if TINY else [1024]))
    model = PolyEmbedder(backbone, processor, cfg, name="bench").to(DEVICE)
    n_vis = sum(p.numel() for p in backbone.visual.parameters())
    n_lm = sum(p.numel() for n, p in backbone.language_model.named_parameters() if "embed_tokens" not in n)
    return model, {"build_s": round(build_s, 1), "params_lm_nonembed": n_lm, "params_vision": n_vis}


# ---------------------------------------------------------------- inputs
def make_inputs(w: Workload, seed: int = 0) -> dict:
    """The padded batch (baseline), the packed batch (ours) of the same documents, and counts."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(w.batch):
        if w.image:
            grid = w.image // PATCH
            n_img = grid * grid // MERGE**2
            ids = torch.randint(0, TEXT_VOCAB, (w.length + n_img + 2,), generator=g)
            ids[1:1 + n_img] = IMG_TOK
            pixels = torch.randn(grid * grid, 3 * 2 * PATCH * PATCH, generator=g)
            rows.append({"input_ids": ids.numpy(), "mm_token_type_ids": (ids == IMG_TOK).int().numpy(),
                         "pixel_values": pixels.numpy(), "image_grid_thw": torch.tensor([[1, grid, grid]]).numpy()})
        else:
            n = int(torch.randint(w.length // 4, w.length + 1, (1,), generator=g))
            ids = torch.randint(0, TEXT_VOCAB, (n,), generator=g)
            rows.append({"input_ids": ids.numpy(), "mm_token_type_ids": torch.zeros(n, dtype=torch.int32).numpy()})
    n_max = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), n_max, dtype=torch.long)
    mask = torch.zeros(len(rows), n_max, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    padded = {"input_ids": ids, "attention_mask": mask}
    packed = pack_rows(rows, MERGE)
    if w.image:
        padded["mm_token_type_ids"] = (ids == IMG_TOK).int()
        padded["pixel_values"] = packed["pixel_values"].to(DTYPE)
        padded["image_grid_thw"] = packed["image_grid_thw"]
        packed["pixel_values"] = packed["pixel_values"].to(DTYPE)
    to = lambda batch: {k: v.to(DEVICE) for k, v in batch.items()}  # noqa: E731
    return {"padded": to(padded), "packed": to(packed), "real_tokens": int(mask.sum()),
            "padded_tokens": mask.numel(), "patches": sum(len(r.get("pixel_values", ())) for r in rows)}


# ---------------------------------------------------------------- steps
def baseline_loss(hidden, mask):
    """The baseline script's loss: mean pooling, InfoNCE against the rolled batch."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    e = F.normalize(((hidden * m).sum(1) / m.sum(1)).float(), dim=-1)
    sim = e @ e.roll(1, 0).T / 0.05
    return F.cross_entropy(sim, torch.arange(len(e), device=e.device))


def baseline_step(model, batch, train, opt):
    backbone = model.backbone
    kw = dict(batch)
    if "mm_token_type_ids" in kw and "mm_token_type_ids" not in inspect.signature(backbone.forward).parameters:
        kw.pop("mm_token_type_ids")
    if not train:
        with torch.no_grad():
            backbone(**kw)
        return
    loss = baseline_loss(backbone(**kw).last_hidden_state, batch["attention_mask"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def ours_step(model, batch, train, opt):
    if not train:
        with torch.no_grad():
            model(**batch)
        return
    e = model(**batch).embedding
    loss = infonce(e, e.roll(1, 0), 0.05).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- timing
def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, warm, reps) -> float:
    for _ in range(warm):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def matmul_tflops() -> float | None:
    if DEVICE != "cuda":
        return None
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    s = timed(lambda: a @ b, 3, 10)
    return 2 * 8192**3 / s / 1e12


def set_checkpointing(model, on: bool) -> None:
    backbone = model.backbone
    if on:
        model.enable_gradient_checkpointing()
    elif hasattr(backbone, "activation_checkpointing_disable"):
        backbone.activation_checkpointing_disable()
    else:
        backbone.gradient_checkpointing_disable()


def measure(step, model, inputs: dict, layout: str, w: Workload, opt, sizes: dict, ceiling: float | None,
            reps: tuple[int, int]) -> dict:
    """Seconds per step of `step` on the `layout` ("padded" | "packed") batch, and the rates."""
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        s = timed(lambda: step(model, inputs[layout], w.train, opt), *reps)
    except Exception as e:  # an OOM or a missing kernel must not cost the other rows
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        traceback.print_exc()
        return {"error": repr(e)[:300]}
    flops = (6 if w.train else 2) * (sizes["params_lm_nonembed"] * inputs["real_tokens"]
                                     + sizes["params_vision"] * inputs["patches"])
    r = {"s_per_step": round(s, 4), "real_tokens_per_s": round(inputs["real_tokens"] / s),
         "samples_per_s": round(w.batch / s, 1), "model_tflops": float(f"{flops / s / 1e12:.4g}")}
    if DEVICE == "cuda":
        r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    if ceiling:
        r["mfu_vs_matmul"] = round(r["model_tflops"] / ceiling, 3)
    return r


def choose_attention(requested: str) -> str:
    if requested != "auto":
        return register_varlen_attention() if requested == VARLEN else requested
    import importlib.util

    if DEVICE == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if varlen_available():
        return register_varlen_attention()
    return "sdpa"  # CPU: packed batches with a block-diagonal mask


def set_attention(model, attention: str) -> None:
    """`attention` on the language model; with VARLEN the vision tower takes the varlen kernel too."""
    if attention == VARLEN:
        model.use_varlen_attention()
    else:
        model.backbone.set_attn_implementation(attention)


def check_packed_equals_padded(model, attention: str) -> dict:
    """Our embeddings of the same documents, padded through SDPA vs packed through `attention`
    (eval mode, this run's dtype): the GPU-side check of what tests/test_packing.py shows on CPU."""
    out = {}
    for w in (Workload("text", False, 4, 256), Workload("image+text", False, 4, 16, 56 if TINY else 112)):
        inputs = make_inputs(w, seed=123)
        padded = dict(inputs["padded"], mm_token_type_ids=(inputs["padded"]["input_ids"] == IMG_TOK).int())
        try:
            with torch.no_grad():
                model.backbone.set_attn_implementation("sdpa")
                a = model(**padded).embedding
                set_attention(model, attention)
                b = model(**inputs["packed"]).embedding
            out[w.name] = {"max_abs_diff": float(f"{(a - b).abs().max().item():.3g}"),
                           "min_cosine": round(F.cosine_similarity(a, b, dim=-1).min().item(), 5)}
        except Exception as e:
            traceback.print_exc()
            out[w.name] = {"error": repr(e)[:300]}
    return out


# ---------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 workloads, fewer reps: < 4 min on an H100")
    parser.add_argument("--compile", action="store_true", help="also run ours with torch.compile'd layers")
    parser.add_argument("--gc", action="store_true", help="ours checkpoints every training workload")
    parser.add_argument("--attn", default="auto", choices=["auto", "sdpa", "flash_attention_2", VARLEN],
                        help="our attention for packed batches (auto: flash_attn, else torch varlen, else sdpa)")
    parser.add_argument("--profile", default="", help="workload name prefixes whose last `ours` step is "
                        "profiled (top kernels printed, and written to $OUT)")
    parser.add_argument("--only", default="", help="comma-separated workload name prefixes, e.g. A_,B_")
    args = parser.parse_args(argv)
    workloads = TINY_SET if TINY else QUICK if args.quick else FULL
    if args.only:
        workloads = [w for w in workloads if any(w.name.startswith(p) for p in args.only.split(","))]
    reps = {True: (1, 2), False: (2, 3)} if args.quick or TINY else {True: (2, 3), False: (2, 5)}
    started = time.time()
    res = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"), "command": " ".join(["python", *sys.argv]), "tiny": TINY}
    torch.manual_seed(0)
    model, sizes = build()
    res.update(sizes)
    ceiling = matmul_tflops()
    res["matmul_tflops"] = round(ceiling, 1) if ceiling else None
    inputs = {w.name: make_inputs(w, seed=i) for i, w in enumerate(workloads)}
    for w in workloads:
        res.setdefault(w.name, {})["padding_fraction"] = round(
            1 - inputs[w.name]["real_tokens"] / inputs[w.name]["padded_tokens"], 3)
    print(f"built in {sizes['build_s']} s; matmul {res['matmul_tflops']} TFLOP/s; "
          f"{res['device']}, torch {res['torch']}, transformers {res['transformers']}", flush=True)

    # Baseline first: plain HF, SDPA, its own AdamW; then ours on the same weights.
    model.backbone.set_attn_implementation("sdpa")
    opt = torch.optim.AdamW(model.backbone.parameters(), lr=1e-5)
    model.train()
    for w in workloads:
        set_checkpointing(model, w.gc)
        res[w.name]["baseline"] = measure(baseline_step, model, inputs[w.name], "padded", w, opt, sizes, ceiling,
                                          reps[w.train])
        _log(w.name, "baseline", res[w.name]["baseline"])
        save(res)
    del opt

    attention = choose_attention(args.attn)
    res["ours_attention"] = attention
    res["check_packed_vs_padded"] = check_packed_equals_padded(model.eval(), attention)
    print(f"packed ({attention}) vs padded (sdpa) embeddings: {res['check_packed_vs_padded']}", flush=True)
    model.train()
    set_attention(model, attention)
    patch_embed_as_linear(model.backbone)  # what load_backbone does; the baseline kept the Conv3d
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE == "cuda")
    variants = [("ours", False)] + ([("ours+compile", True)] if args.compile else [])
    for label, compiled in variants:
        if compiled:
            model.compile_layers()
        for w in workloads:
            checkpoint_options = [w.gc or args.gc] + ([False] if w.train and (w.gc or args.gc) else [])
            for gc in checkpoint_options:
                name = label + ("+gc" if gc else "")
                set_checkpointing(model, gc)
                if compiled:  # each row compiles afresh, as the one workload of a training run does
                    torch._dynamo.reset()
                res[w.name][name] = measure(ours_step, model, inputs[w.name], "packed", w, opt, sizes, ceiling,
                                            reps[w.train])
                _log(w.name, name, res[w.name][name])
                save(res)
    for w in workloads:
        if args.profile and any(w.name.startswith(p) for p in args.profile.split(",")):
            profile(model, inputs[w.name]["packed"], w, opt)
    res["wall_s"] = round(time.time() - started, 1)
    print_table(res, workloads)
    out = save(res)
    if out:
        print(f"wrote {out}")
    return res


def profile(model, batch: dict, w: Workload, opt) -> None:
    """Where one step of ours spends its time: the top operators by device time (after two warm steps)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    set_checkpointing(model, False)
    for _ in range(2):
        ours_step(model, batch, w.train, opt)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        ours_step(model, batch, w.train, opt)
        sync()
    key = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
    print(f"\n[profile] {w.name}, ours, one step\n{table}", flush=True)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"profile_{w.name}.txt").write_text(table)


def save(res: dict) -> Path | None:
    """Write the results so far to $OUT (after every row: a run cut short still leaves its rows)."""
    if not os.environ.get("OUT"):
        return None
    out = Path(os.environ["OUT"]) / ("gpu_throughput_tiny.json" if TINY else "gpu_throughput.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    return out


def _log(workload, path, r):
    print(f"  {workload:28s} {path:18s} {r}", flush=True)


def print_table(res: dict, workloads: list[Workload]) -> None:
    print(f"\n{res['device']} · torch {res['torch']} · transformers {res['transformers']} · "
          f"bf16 matmul {res['matmul_tflops']} TFLOP/s · ours: packed, {res.get('ours_attention')} · "
          f"{res['wall_s']} s in all")
    print(f"packed vs padded embeddings: {res.get('check_packed_vs_padded')}")
    head = f"| {'workload':27s} | {'path':17s} | tokens/s | samples/s | TFLOP/s | of matmul | peak GiB | × baseline |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for w in workloads:
        base = res[w.name].get("baseline", {})
        for path, r in res[w.name].items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                print(f"| {w.name:27s} | {path:17s} | error: {r['error'][:70]} |")
                continue
            ratio = r["real_tokens_per_s"] / base["real_tokens_per_s"] if base.get("real_tokens_per_s") else None
            r["ratio_to_baseline"] = round(ratio, 2) if ratio else None
            print(f"| {w.name:27s} | {path:17s} | {r['real_tokens_per_s']:8d} | {r['samples_per_s']:9.1f} | "
                  f"{r['model_tflops']:7.4g} | {_fmt(r.get('mfu_vs_matmul')):>9s} | {_fmt(r.get('peak_gib')):>8s} | "
                  f"{_fmt(r['ratio_to_baseline']):>10s} |")


def _fmt(x) -> str:
    return "—" if x is None else f"{x:g}"


if __name__ == "__main__":
    main()
