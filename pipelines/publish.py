"""Publish a saved model folder to the Hugging Face Hub.

    python -m pipelines.publish --model runs/qwen2vl-2b/model --repo ORG/NAME [--private] [--dry-run]

The folder is checked first, and nothing is sent unless every check passes: it is a saved
PolyEmbedder (vipoly.json, config.json, safetensors weights and heads, tokenizer and image
processor), its sentence-transformers files name vipoly's module, its README.md is a complete model
card (front matter keys and sections: vipoly.model.card), and it holds no pickles (.bin, .pt,
.pkl, …) and no code (.py). Then exactly the listed files go up in one commit (huggingface_hub's
`create_commit`; large files through the hub's LFS), the repository created where it does not exist.
`--dry-run` lists what would go, with sizes, and stops. The token is huggingface_hub's own
(`hf auth login`, HF_TOKEN) unless --token is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".h5", ".msgpack")
CODE_SUFFIXES = (".py", ".pyc", ".so", ".sh")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.publish", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="saved model folder (a run's model/)")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="Hub model repository")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="check the folder and list what would be uploaded")
    p.add_argument("--token", default=None, help="Hub token (default: huggingface_hub's stored one or HF_TOKEN)")
    p.add_argument("--message", default=None, help="commit message (default: 'vipoly: upload <name>')")
    return p


def check_folder(model_dir: Path) -> list[Path]:
    """The files to upload (relative paths, sorted) of a folder that passes every check; a
    ValueError naming the file or key otherwise."""
    from vipoly.model.card import CARD_FILE, check_card
    from vipoly.model.embedder import FORMAT, HEADS_FILE
    from vipoly.folder import META_FILE
    from vipoly.st import read_st_config

    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: no such folder")
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{model_dir}: not a saved model folder (no {META_FILE}; a PolyEmbedder's "
                         f"save_pretrained writes one)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: key 'format' is {meta.get('format')!r}; a saved model has {FORMAT} "
                         f"(an inputs-only folder cannot be published)")
    files = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts))
    for f in files:
        if f.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{model_dir / f}: pickle-capable file; only safetensors are published (remove it)")
        if f.suffix in CODE_SUFFIXES:
            raise ValueError(f"{model_dir / f}: code file; the folder must hold no code (vipoly comes from pip)")
    names = {str(f) for f in files}
    weights = [n for n in names if n == "model.safetensors" or (n.startswith("model-") and n.endswith(".safetensors"))]
    required = ["config.json", HEADS_FILE, "preprocessor_config.json", *TOKENIZER_FILES, CARD_FILE]
    missing = [n for n in required if n not in names] + ([] if weights else ["model.safetensors"])
    if len(weights) > 1 and "model.safetensors.index.json" not in names:
        missing.append("model.safetensors.index.json")
    if missing:
        raise ValueError(f"{model_dir}: missing {missing}")
    _check_safetensors(model_dir, [n for n in names if n.endswith(".safetensors")])
    read_st_config(model_dir)
    check_card(model_dir / CARD_FILE)
    return files


def _check_safetensors(model_dir: Path, names: list[str]) -> None:
    """Each weight file's header reads (catches a truncated or non-safetensors file) without loading it."""
    from safetensors import safe_open

    for n in sorted(names):
        try:
            with safe_open(str(model_dir / n), framework="np") as f:
                if not list(f.keys()):
                    raise ValueError("no tensors")
        except Exception as e:  # noqa: BLE001 — safetensors raises several kinds for a bad header
            raise ValueError(f"{model_dir / n}: not a readable safetensors file ({e})") from None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(args.repo)
    except HFValidationError as e:
        raise SystemExit(f"--repo {args.repo!r}: {e}") from None
    if "/" not in args.repo:
        raise SystemExit(f"--repo {args.repo!r}: expected ORG/NAME")
    model_dir = Path(args.model)
    try:
        files = check_folder(model_dir)
    except ValueError as e:
        raise SystemExit(f"--model: {e}") from None
    from vipoly.model.card import DEMO_TAG

    card = ModelCard.load(model_dir / "README.md")  # the hub library's own reading of the card
    sizes = [(model_dir / f).stat().st_size for f in files]
    print(f"{model_dir} → https://huggingface.co/{args.repo} ({'private' if args.private else 'public'}); "
          f"card: library_name={card.data.library_name}, base_model={card.data.base_model}")
    for f, n in zip(files, sizes):
        print(f"  {_size(n):>10}  {f}")
    print(f"  {_size(sum(sizes)):>10}  total, {len(files)} files")
    if DEMO_TAG in (card.data.tags or []):
        print(f"note: the card is tagged {DEMO_TAG}: a pipeline demonstration, not a model for search")
    if "/" not in str(card.data.base_model):
        print(f"note: base_model {card.data.base_model!r} is not a hub id (ORG/NAME); the hub will not link it")
    if args.dry_run:
        print("dry run: checks passed, nothing uploaded")
        return 0

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=args.token)
    api.create_repo(args.repo, repo_type="model", private=args.private, exist_ok=True)
    name = json.loads((model_dir / "vipoly.json").read_text()).get("name", model_dir.name)
    info = api.create_commit(repo_id=args.repo, repo_type="model",
                             operations=[CommitOperationAdd(path_in_repo=f.as_posix(), path_or_fileobj=str(model_dir / f))
                                         for f in files],
                             commit_message=args.message or f"vipoly: upload {name}")
    print(f"uploaded {len(files)} files: {info.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
