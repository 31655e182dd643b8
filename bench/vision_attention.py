"""Vision-tower attention on one GPU: the varlen kernel against dense SDPA backends, same inputs.

    python bench/vision_attention.py [--images 32 --side 448]

Qwen2-VL's vision tower attends within each image (no causal mask, 16 heads of 80 dims). When all
images of a batch have the same size, the varlen call is a dense batched attention in disguise, so
the dense SDPA kernels (FlashAttention, cuDNN, memory-efficient) apply too. Prints ms per call,
forward and forward+backward, and the largest difference to the varlen output.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--side", type=int, default=448)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=80)
    args = p.parse_args()
    from torch.nn.attention.varlen import varlen_attn

    n = (args.side // 14) ** 2
    total = args.images * n
    q, k, v = (torch.randn(total, args.heads, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    cu = torch.arange(0, total + 1, n, device="cuda", dtype=torch.int32)

    def varlen():
        return varlen_attn(q, k, v, cu, cu, n, n)

    def dense(backend):
        def run():
            with sdpa_kernel([backend]):
                qd, kd, vd = (x.view(args.images, n, args.heads, args.dim).transpose(1, 2) for x in (q, k, v))
                return F.scaled_dot_product_attention(qd, kd, vd).transpose(1, 2).reshape(total, args.heads, args.dim)
        return run

    ref = varlen()
    print(f"{args.images} images × {n} patches, {args.heads} heads × {args.dim}: torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}")
    for name, fn in [("varlen (flash)", varlen), ("dense flash", dense(SDPBackend.FLASH_ATTENTION)),
                     ("dense cuDNN", dense(SDPBackend.CUDNN_ATTENTION)),
                     ("dense mem-efficient", dense(SDPBackend.EFFICIENT_ATTENTION))]:
        try:
            out = fn()
            diff = (out.float() - ref.float()).abs().max().item()
            fwd = timed(lambda: fn())
            grad = torch.randn_like(ref)
            both = timed(lambda: torch.autograd.grad(fn(), (q, k, v), grad))
            print(f"  {name:<22} fwd {fwd:7.3f} ms   fwd+bwd {both:7.3f} ms   max |Δ| vs varlen {diff:.2e}")
        except Exception as e:  # a backend this build or card lacks
            print(f"  {name:<22} unavailable: {str(e).splitlines()[0][:120]}")


if __name__ == "__main__":
    main()
