"""Raw sources → canonical Parquet shards per task, a quarantine report and a manifest.

    python -m pipelines.prepare --format squad --input xquad.vi.json xquad.en.json --out data/xquad
    python -m pipelines.prepare --format pairs --input vnPara/ --out data/vnpara --set data.overlong=reject
    python -m pipelines.prepare --format parallel --input src.eng.txt ref.vie.txt --out data/bitext
    python -m pipelines.prepare --format hf --input my_saved_dataset/ --columns query_text=question,pos_text=answer \
        --task instr --out data/mine

OUT/<task>/part-*.parquet, OUT/quarantine.jsonl (id, source, reason) and OUT/manifest.json; the
summary prints the good and quarantined counts. The passes are in `vipoly.data.prepare`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import ray

from vipoly.config import add_config_args, config_from_args
from vipoly.data.converters import FORMATS, ConvertOptions
from vipoly.data.prepare import prepare


def _parse_mapping(items: list[str] | None, what: str, cast=str) -> dict[str, Any]:
    out = {}
    for item in items or []:
        for part in item.split(","):
            if "=" not in part:
                raise ValueError(f"{what}: expected key=value, got {part!r}")
            k, v = part.split("=", 1)
            out[k.strip()] = cast(v.strip())
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--input", required=True, nargs="+", help="input files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", help="task of the converted rows (default: the format's)")
    p.add_argument("--lang", help="language of the rows (default: from file names, else guessed from text)")
    p.add_argument("--langs", help="parallel: comma-separated language of each input, in order")
    p.add_argument("--columns", action="append", help="canonical=source column mapping, e.g. query_text=question")
    p.add_argument("--split", help="hf: the split to read (default: all)")
    p.add_argument("--labels", action="append", help="pairs: extra label=score entries, e.g. yes=1,no=0")
    p.add_argument("--negatives", type=int, default=0,
                   help="squad: up to N other paragraphs of the same article as each question's hard negatives")
    p.add_argument("--rows-per-file", type=int, default=100_000)
    p.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")
    return add_config_args(p)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    opts = ConvertOptions(task=args.task, lang=args.lang, langs=args.langs.split(",") if args.langs else None,
                          columns=_parse_mapping(args.columns, "--columns"), split=args.split,
                          labels=_parse_mapping(args.labels, "--labels", float), negatives=args.negatives)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()  # ray: no bars in logs
    m = prepare(args.format, args.input, args.out, opts, cfg.data, overwrite=args.overwrite,
                rows_per_file=args.rows_per_file, ray_address=cfg.run.ray_address)
    print(f"prepared {args.out}: good {m['good']}, quarantined {m['quarantined']}")
    for task, n in m["rows"].items():
        langs = ", ".join(f"{l} {c}" for l, c in m["rows_by_lang"][task].items())
        print(f"  {task:<11} {n:>8} rows  {m['bytes'][task] / 1e6:8.2f} MB  ({langs})")
    for reason, n in sorted(m["reasons"].items(), key=lambda x: -x[1]):
        print(f"  quarantined {n:>6}  {reason}")
    return m


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
