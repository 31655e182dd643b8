"""python -m vipoly.st add DIR [--run RUN_DIR] [--default-prompt TASK|none] [--card] [--license ID]

Give a model folder saved before vipoly wrote them the sentence-transformers files (modules.json,
config_sentence_transformers.json) and, where it has none (or with --card), the model card. The
weights are not touched. A folder that is a run's `model/` reads its run (config.yaml,
metrics.jsonl) from the folder above unless --run says otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from vipoly.model.card import CARD_FILE, run_dir_of, write_card
from vipoly.folder import META_FILE, is_polyembedder_dir
from vipoly.st import ST_CONFIG_FILE, default_task, write_st_files
from vipoly.tasks import TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vipoly.st",
                                description="Sentence-transformers files and model card for saved model folders.")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add the sentence-transformers files (and a model card) to a saved model folder")
    add.add_argument("model_dir", metavar="DIR")
    add.add_argument("--run", metavar="RUN_DIR", default=None,
                     help="the training run of the model (default: DIR/.. when it holds config.yaml)")
    add.add_argument("--default-prompt", metavar="TASK", default=None, choices=[*TASKS, "none"],
                     help="default sentence-transformers prompt (default: the run's main task, else the folder's, else none)")
    add.add_argument("--card", action="store_true", help="write the model card even where README.md exists "
                     "(its evaluation section is kept)")
    add.add_argument("--license", default="apache-2.0", help="license id in the card (default apache-2.0)")
    return p


def run_of(model_dir: Path, given: str | None) -> Path | None:
    if given is None:
        return run_dir_of(model_dir)
    run = Path(given)
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"--run {run}: not a training run directory (no config.yaml)")
    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model_dir = Path(args.model_dir)
    if not is_polyembedder_dir(model_dir):
        raise SystemExit(f"{model_dir}: not a saved PolyEmbedder (no {META_FILE})")
    run = run_of(model_dir, args.run)
    config = (yaml.safe_load((run / "config.yaml").read_text()) or {}) if run else {}
    if args.default_prompt is not None:
        default = None if args.default_prompt == "none" else args.default_prompt
    elif config:
        default = default_task(config)
    elif (model_dir / ST_CONFIG_FILE).is_file():
        default = json.loads((model_dir / ST_CONFIG_FILE).read_text()).get("default_prompt_name")
    else:
        default = None
    written = write_st_files(model_dir, default)
    if args.card or not (model_dir / CARD_FILE).is_file():
        written.append(write_card(model_dir, run_dir=run, config=config or None, license=args.license))
    print(f"wrote {', '.join(p.name for p in written)} in {model_dir} (default prompt: {default}"
          + (f"; run: {run}" if run else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
