"""Evaluate a saved PolyEmbedder on retrieval, bitext, paraphrase, STS, XNLI and canonical suites.

    python -m pipelines.evaluate --model runs/demo/model \\
        --suite retrieval:squad:../shared/data/eval/xquad/xquad.vi.json \\
        --suite retrieval:squad:../shared/data/eval/xquad/xquad.vi.json,../shared/data/eval/xquad/xquad.en.json \\
        --suite bitext:../shared/data/eval/ntrex128/newstest2019-ref.vie.txt,../shared/data/eval/ntrex128/newstest2019-src.eng.txt \\
        --out runs/demo/eval.json --examples 3

Writes FILE (.json) and FILE with .md; with --examples K also FILE with .examples.md and, for image
inputs met by a suite or given by --image, pooling heat maps FILE stem + `.attention-*.png`.
With --card MODEL_DIR the model card (MODEL_DIR/README.md) gets this run's tables, BM25 rows
included, as its evaluation section (replacing the one there; a folder without a card gets one).
Runs in one process (no Ray): evaluation sets are small, and `pipelines.embed` is the scalable path.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from vipoly.config import ConfigError, add_config_args, config_from_args
from vipoly.eval.loading import inference_overrides, load_for_inference
from vipoly.eval.report import write_report
from vipoly.eval.suites import Item, Options, parse_suite
from vipoly.folder import read_meta
from vipoly.tasks import TASKS, check_task


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="PolyEmbedder directory (save_pretrained output)")
    p.add_argument("--suite", action="append", required=True, metavar="SPEC",
                   help="retrieval:squad:PATH[,QUERY_PATH] | bitext:A,B[,C] | pairs:S1,S2,LABELS | sts:FILE | "
                        "xnli:PATH[,HYP_PATH] | canonical:DIR (repeatable)")
    p.add_argument("--out", required=True, help="result file (.json); a .md table is written beside it")
    p.add_argument("--examples", type=int, default=0, metavar="K", help="nearest-neighbour examples per retrieval suite")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="extra image for a pooling-attention heat map (with --examples)")
    p.add_argument("--task", choices=TASKS, default=None, help="task prefix for non-canonical suites (default: none)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dim", type=int, default=None, help="truncate embeddings to this Matryoshka size")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N queries / pairs per suite (seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--card", metavar="MODEL_DIR", default=None,
                   help="write the results into MODEL_DIR/README.md (the model card's evaluation section)")
    add_config_args(p)  # model.{attn_implementation,dtype,max_length,image_*_pixels} apply; see vipoly.eval.loading
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_task(args.task)
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be ≥ 1")
    model_dir = Path(args.model)
    try:
        read_meta(model_dir)
        overrides = inference_overrides(config_from_args(args))
    except (ValueError, ConfigError) as e:
        raise SystemExit(str(e)) from None
    if args.card is not None:
        try:
            check_card_target(Path(args.card))
        except ValueError as e:
            raise SystemExit(f"--card: {e}") from None
    try:
        suites = [parse_suite(s) for s in args.suite]  # bad specs and missing files fail before loading
    except ValueError as e:
        raise SystemExit(f"--suite: {e}") from None
    extra_images = [Path(p) for p in args.image]
    for p in extra_images:
        if not p.is_file():
            raise SystemExit(f"--image: file not found: {p}")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_for_inference(model_dir, overrides, device)
    opts = Options(task=args.task, batch_size=args.batch_size, limit=args.limit, seed=args.seed,
                   examples=args.examples, dim=args.dim, progress=not args.no_progress)
    results, examples, images = [], [], []
    for suite in suites:
        t0 = time.perf_counter()
        out = suite.run(model, opts)
        results += out.results
        examples += out.examples
        images += out.images
        print(f"[evaluate] {suite.spec}: {len(out.results)} result(s) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    meta = {"model": str(model_dir), "created": dt.datetime.now().isoformat(timespec="seconds"),
            "task": args.task, "limit": args.limit, "dim": args.dim, "overrides": overrides, "suites": args.suite}
    json_path, md_path = write_report(results, args.out, meta)
    print(md_path.read_text())
    if args.examples:
        from vipoly.eval.attention import write_heatmaps

        ex_path = json_path.with_suffix(".examples.md")
        # the first K images the suites met, and every --image
        images = images[: args.examples] + [(p.stem, Item(image=p.read_bytes()), args.task) for p in extra_images]
        pngs = write_heatmaps(model, images, json_path.with_suffix(""))
        body = "\n".join(examples) or "(no retrieval suite ran)\n"
        if pngs:
            body += "\n## Pooling attention\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
        ex_path.write_text(f"# Nearest neighbours: {model_dir}\n\n{body}")
        print(f"[evaluate] examples: {ex_path}" + (f", heat maps: {', '.join(p.name for p in pngs)}" if pngs else ""),
              file=sys.stderr)
    print(f"[evaluate] wrote {json_path} and {md_path}", file=sys.stderr)
    if args.card is not None:
        from vipoly.eval.report import evaluation_markdown
        from vipoly.model.card import set_evaluation

        card = set_evaluation(args.card, evaluation_markdown(results, meta))
        print(f"[evaluate] model card: {card}", file=sys.stderr)
    return 0


def check_card_target(model_dir: Path) -> None:
    """--card's folder must be a saved model whose README.md, if any, is a model card we can edit:
    checked before any model work, so a typo does not cost an evaluation run."""
    from vipoly.model.card import CARD_FILE, check_card
    read_meta(model_dir)
    if (model_dir / CARD_FILE).is_file():
        check_card(model_dir / CARD_FILE)


if __name__ == "__main__":
    sys.exit(main())
