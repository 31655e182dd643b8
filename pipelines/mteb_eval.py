"""Evaluate a saved model with MTEB's own harness (mteb.evaluate) on MTEB tasks or local SQuAD files.

    # MTEB's Vietnamese benchmark (VN-MTEB; its data comes from the Hugging Face Hub: needs a network)
    python -m pipelines.mteb_eval --model runs/qwen2vl-2b/model --benchmark "VN-MTEB (vie, v1)" --prompt instr --out runs/mteb
    python -m pipelines.mteb_eval --model DIR --task SciFact-VN --task NQ-VN --prompt instr
    # no network: a retrieval task built from a local SQuAD-format file (vipoly.eval.mteb.squad_task)
    python -m pipelines.mteb_eval --model DIR --squad ../shared/data/eval/xquad/xquad.vi.json --limit 100 --prompt instr

The model goes in as a SentenceTransformer (vipoly.st), so MTEB runs its own search and scoring.
--prompt puts that task's prefix on queries and documents (as `pipelines.evaluate --task`).
Prints each task's main score; with --out, MTEB's result files land there and summary.json beside them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vipoly.folder import read_meta
from vipoly.tasks import TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.mteb_eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="saved model folder")
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME",
                   help='an MTEB benchmark, e.g. "VN-MTEB (vie, v1)" (repeatable; data from the hub)')
    p.add_argument("--task", action="append", default=[], metavar="NAME", help="an MTEB task, e.g. SciFact-VN (repeatable)")
    p.add_argument("--squad", action="append", default=[], metavar="PATH", help="a local SQuAD-format file (repeatable)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="--squad: at most N questions (seeded, as pipelines.evaluate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", choices=TASKS, default=None, help="task prefix on queries and documents")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, metavar="DIR", help="keep MTEB's result files and summary.json here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.benchmark or args.task or args.squad):
        raise SystemExit("nothing to run: give --benchmark, --task or --squad")
    try:
        read_meta(args.model, "--model")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    import mteb

    from vipoly.eval.mteb import evaluate, squad_task

    tasks = []
    try:
        for name in args.benchmark:
            tasks += list(mteb.get_benchmark(name).tasks)
        if args.task:
            tasks += list(mteb.get_tasks(tasks=args.task))
        tasks += [squad_task(p, args.limit, args.seed) for p in args.squad]
    except (KeyError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.perf_counter()
    scores = evaluate(args.model, tasks, prompt=args.prompt, batch_size=args.batch_size, device=args.device,
                      cache_dir=args.out, progress=True)
    mains = {t.metadata.name: t.metadata.main_score for t in tasks}
    summary = {}
    for name, splits in scores.items():
        for split, subsets in splits.items():
            for sub in subsets:
                key = f"{name}/{split}" + (f"/{sub.get('hf_subset')}" if sub.get("hf_subset") not in (None, "default") else "")
                summary[key] = {mains.get(name, "main_score"): sub.get("main_score")}
                print(f"{key}: {mains.get(name, 'main_score')} = {sub.get('main_score'):.4f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"model": args.model, "prompt": args.prompt, "scores": summary},
                                                     indent=2) + "\n")
    print(f"[mteb] {len(tasks)} task(s) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
