"""The model card: README.md of a saved model folder, in the Hugging Face card format.

    ---
    library_name, pipeline_tag: feature-extraction, language: [vi, en, zh], license, tags, base_model
    ---
    # <name>
    ## Model          what it is: backbone → pooling → projection → L2, sizes, Matryoshka dims, prompts
    ## Training       read from the run: config, data mix and samples seen per task (and per language,
                      estimated from the data's manifest), steps, wall time, hardware
    ## Usage          vipoly and sentence-transformers
    ## Evaluation     `python -m pipelines.evaluate … --card DIR` writes it, BM25 rows beside ours
    ## Limitations

A training run's export writes it (`vipoly.train.engine`: `write_card(model_dir, run_dir, …)`);
`python -m vipoly.st add DIR --card` writes or refreshes it for a folder saved earlier, keeping its
evaluation section. A demo model (built from the tiny random backbone) says at the top that it
demonstrates the pipeline. `check_card` is what `pipelines.publish` validates before an upload.

Per-language counts: metrics.jsonl counts samples per task only. The card multiplies each task's
count by that task's language shares in the prepared data's manifest.json and marks them "≈".
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from vipoly.folder import read_meta
from vipoly.tasks import LANGS, TASKS, prefix

CARD_FILE = "README.md"
FRONT_KEYS = ("library_name", "pipeline_tag", "language", "license", "tags", "base_model")
SECTIONS = ("Model", "Training", "Usage", "Evaluation", "Limitations")
EVAL_START, EVAL_END = "<!-- vipoly:evaluation -->", "<!-- /vipoly:evaluation -->"
TINY_BACKBONE = "vipoly-tiny"  # the provenance vipoly.model.tiny records: a demo model
DEMO_TAG = "pipeline-demo"
NO_EVALUATION = ("Not evaluated yet. `python -m pipelines.evaluate --model DIR --suite … --card DIR` "
                 "writes this section, with BM25 beside the model on every text retrieval suite.")


# ---------------------------------------------------------------- write
def write_card(model_dir: str | Path, run_dir: str | Path | None = None, config: Mapping[str, Any] | None = None,
               hardware: str | None = None, license: str = "apache-2.0", evaluation: str | None = None) -> Path:
    """Write `model_dir/README.md` and return its path.

    run_dir: the training run (config.yaml, metrics.jsonl, plan.json) the summary is read from;
    None for a folder saved outside a run. config: the run's config as a dict (default: run_dir's
    config.yaml). hardware: what the run ran on (default: described from the config).
    evaluation: the evaluation section's body; None keeps the one the card already has.
    """
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    run = Path(run_dir) if run_dir is not None else None
    if config is None and run is not None and (run / "config.yaml").is_file():
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    config = dict(config or {})
    if evaluation is None:
        evaluation = _existing_evaluation(model_dir / CARD_FILE) or NO_EVALUATION
    text = render_card(meta, config, training_summary(run, config, hardware), license, evaluation,
                       _st_default(model_dir))
    path = model_dir / CARD_FILE
    path.write_text(text, encoding="utf-8")
    return path


def write_run_card(model_dir: str | Path, cfg: Any, device: Any = None) -> Path | None:
    """The card a training run's export writes (rank 0, after `save_pretrained`): the summary read
    from `cfg.run.dir`, the hardware from the device and the number of workers. A card that cannot
    be written is reported, not raised: the model folder, the run's result, is already complete."""
    import torch.distributed as dist

    config = cfg.to_dict()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    try:
        hardware = hardware_summary(device, world, config) if device is not None else None
        return write_card(model_dir, run_dir=cfg.run.dir, config=config, hardware=hardware)
    except Exception as e:  # noqa: BLE001 — see the docstring
        print(f"warning: model card not written ({type(e).__name__}: {e}); write it with "
              f"`python -m vipoly.st add {model_dir} --card --run {cfg.run.dir}`", flush=True)
        return None


def set_evaluation(model_dir: str | Path, body: str) -> Path:
    """Replace the card's evaluation section with `body` (writing a card first where there is none)."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        return write_card(model_dir, run_dir=run_dir_of(model_dir), evaluation=body)
    check_card(path)  # refuse to edit a README that is not our card
    text = path.read_text(encoding="utf-8")
    start, end = text.find(EVAL_START), text.find(EVAL_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: the evaluation section has no {EVAL_START} … {EVAL_END} markers; "
                         f"rewrite the card with `python -m vipoly.st add {model_dir} --card`")
    path.write_text(text[:start + len(EVAL_START)] + "\n" + body.strip() + "\n" + text[end:], encoding="utf-8")
    return path


def run_dir_of(model_dir: str | Path) -> Path | None:
    """The training run a model folder came from: the folder above, when it is a run (config.yaml)."""
    parent = Path(model_dir).resolve().parent
    return parent if (parent / "config.yaml").is_file() else None


def training_summary(run_dir: Path | None, config: Mapping[str, Any], hardware: str | None = None) -> dict[str, Any]:
    """What the card says about training: steps, samples per task (and ≈ per language), loss, time."""
    out: dict[str, Any] = {"run_dir": str(run_dir) if run_dir else None, "hardware": hardware or _hardware_of(config)}
    rows = _metrics(run_dir / "metrics.jsonl") if run_dir else []
    if rows:
        first, last = rows[0], rows[-1]
        out.update(steps=last.get("step"), first_loss=first.get("loss"), last_loss=last.get("loss"),
                   bad_steps=last.get("bad_steps_total", 0),
                   seen={t: int(last.get(f"samples_seen/{t}", 0)) for t in TASKS})
        out["wall_s"] = _wall_seconds(run_dir)
    shares = _language_shares(config)
    if "seen" in out and shares:
        out["seen_by_lang"] = {t: {lang: out["seen"][t] * share for lang, share in shares.get(t, {}).items()}
                               for t in TASKS}
    return out


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wall_seconds(run_dir: Path) -> float | None:
    """From the run directory's first file (plan.json / config.yaml / inputs, written before training
    starts) to the last metrics row; a resumed run's pauses are inside."""
    starts = [p.stat().st_mtime for p in (run_dir / "plan.json", run_dir / "config.yaml", run_dir / "inputs")
              if p.exists()]
    end = run_dir / "metrics.jsonl"
    if not starts or not end.is_file():
        return None
    return max(0.0, end.stat().st_mtime - min(starts))


def _language_shares(config: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {lang: share of the task's rows}} from `data.root`/manifest.json, {} where there is none."""
    root = (config.get("data") or {}).get("root")
    manifest = Path(root) / "manifest.json" if root else None
    if manifest is None or not manifest.is_file():
        return {}
    try:
        by_lang = json.loads(manifest.read_text()).get("rows_by_lang", {})
    except json.JSONDecodeError:
        return {}
    out = {}
    for task, counts in by_lang.items():
        total = sum(counts.values())
        if task in TASKS and total:
            out[task] = {lang: n / total for lang, n in counts.items()}
    return out


def _hardware_of(config: Mapping[str, Any]) -> str | None:
    train = config.get("train") or {}
    if not train:
        return None
    workers, resources = train.get("num_workers", 1), train.get("resources") or {}
    kind = "GPU" if resources.get("use_gpu") else f"CPU ({resources.get('cpus_per_worker', 1)} CPU each)"
    return f"{workers} worker(s), {kind}, {train.get('strategy', 'ddp')}"


def hardware_summary(device: Any, world_size: int, config: Mapping[str, Any]) -> str:
    """What a running export can say about its hardware: the device kind and name, and how many."""
    strategy = (config.get("train") or {}).get("strategy", "ddp")
    if getattr(device, "type", None) == "cuda":
        import torch

        return f"{world_size} × {torch.cuda.get_device_name(device)}, {strategy}"
    import platform

    cpus = ((config.get("train") or {}).get("resources") or {}).get("cpus_per_worker", 1)
    return f"{world_size} CPU worker(s) ({cpus} CPU each, {platform.machine()}, {os.cpu_count()} cores on the node), {strategy}"


# ---------------------------------------------------------------- render
def render_card(meta: Mapping[str, Any], config: Mapping[str, Any], summary: Mapping[str, Any], license: str,
                evaluation: str, default_prompt: str | None) -> str:
    model = meta.get("model", {})
    name = meta.get("name", "vipoly")
    base = model.get("backbone", "")
    demo = base == TINY_BACKBONE
    dims = (model.get("projection") or {}).get("matryoshka_dims") or []
    out_dim = meta.get("embedding_dim") or (model.get("projection") or {}).get("out_dim")
    front = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "feature-extraction",
        "language": ["vi", "en", "zh"],
        "license": license,
        "tags": ["vipoly", "sentence-transformers", "feature-extraction", "sentence-similarity", "multimodal",
                 "qwen2_vl", "image-text-retrieval"] + (["matryoshka"] if dims else []) + ([DEMO_TAG] if demo else []),
        "base_model": base,
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "", f"# {name}", ""]
    if demo:
        lines += ["> **Pipeline demonstration.** This model was built from a tiny random-initialised Qwen2-VL "
                  "(`python -m vipoly.model.tiny`) and trained for minutes on synthetic data on CPU. It shows "
                  "the mechanics of the vipoly pipeline (mixing, task weighting, resumable training, evaluation, "
                  "export), not retrieval quality: do not use it for search.", ""]
    pooling = (model.get("pooling") or {}).get("kind", "attention")
    lines += ["## Model", "",
              f"A unified multimodal embedding model for Vietnamese, English and Chinese, trained with "
              f"vipoly (DLE loss mixes and Strategic Task Weighting over five task types). "
              f"One L2-normalised {out_dim}-d vector per text, image, or text+image input:",
              "", f"`{base}` (Qwen2-VL) → {pooling} pooling → projection (LN·GELU·LN) → L2.", "",
              f"- Embedding size: {out_dim}" + (f"; Matryoshka prefixes trained at {dims}" if dims else ""),
              f"- Longest input: {model.get('max_length')} tokens; images resized to at most "
              f"{model.get('image_max_pixels')} pixels",
              "- Task prefixes (sentence-transformers prompts): "
              + ", ".join(f"`{t}` → `{prefix(t).strip()}`" for t in TASKS)
              + (f"; default prompt: `{default_prompt}`" if default_prompt else "; no default prompt"),
              "- Files: safetensors weights (no pickles), `vipoly.json` (the model config), an ordinary "
              "Qwen2-VL folder for the backbone, `modules.json` + `config_sentence_transformers.json`", ""]
    lines += ["## Training", ""] + _training_lines(config, summary) + [""]
    lines += ["## Usage", ""] + _usage_lines(name, model, dims, default_prompt) + [""]
    lines += ["## Evaluation", "", EVAL_START, evaluation.strip(), EVAL_END, ""]
    lines += ["## Limitations", ""] + _limitation_lines(demo) + [""]
    return "\n".join(lines)


def _training_lines(config: Mapping[str, Any], s: Mapping[str, Any]) -> list[str]:
    if not config and "steps" not in s:
        return ["Saved outside a training run: no training record."]
    train, data, loss, stw = (config.get(k) or {} for k in ("train", "data", "loss", "stw"))
    optimizer = train.get("optimizer") or {}
    lines = []
    if s.get("run_dir"):
        lines.append(f"Read from the run directory `{Path(s['run_dir']).name}` (config.yaml, metrics.jsonl).")
        lines.append("")
    if config:
        batch = train.get("global_batch_size") or (
            (train.get("batch_size") or 0) * (train.get("grad_accum") or 1) * (train.get("num_workers") or 1))
        lines += [
            "| setting | value |", "|---|---|",
            f"| loss | {loss.get('kind', '')} (temperature {loss.get('temperature', '')}) |",
            f"| task weighting (STW) | {stw.get('mode', '')} |",
            f"| steps (train.max_steps) | {train.get('max_steps', '')} |",
            f"| global batch (samples per step) | {batch} |",
            f"| learning rates (language / vision / heads) | {optimizer.get('lr', '')} / "
            f"{optimizer.get('vision_lr', '')} / {optimizer.get('head_lr') or optimizer.get('lr', '')} |",
            f"| strategy | {train.get('strategy', '')}, {train.get('num_workers', '')} worker(s) |",
            f"| seed | {train.get('seed', '')} |",
            f"| data.mix | {_mix_text(data.get('mix') or {})} |", ""]
    if "steps" in s:
        wall = s.get("wall_s")
        lines.append(f"- Steps run: {s['steps']}; loss {s['first_loss']:.4f} → {s['last_loss']:.4f}; "
                     f"skipped (non-finite) steps: {s.get('bad_steps', 0)}")
        lines.append(f"- Wall time: {_duration(wall)} (run directory created → last metrics row; pauses of a "
                     f"resumed run included)" if wall is not None else "- Wall time: not recorded")
    if s.get("hardware"):
        lines.append(f"- Hardware: {s['hardware']}")
    if "seen" in s:
        by_lang = s.get("seen_by_lang")
        langs = [lang for lang in LANGS if by_lang and any(lang in by_lang[t] for t in TASKS)]
        head = "| task | samples seen |" + "".join(f" ≈ {lang} |" for lang in langs)
        lines += ["", "Samples seen per task" + (" and, estimated from each task's language shares in the "
                                                 "prepared data (manifest.json), per language:" if langs else
                                                 " (no data manifest: no per-language counts):"), "",
                  head, "|---|---:|" + "---:|" * len(langs)]
        for t in TASKS:  # a task the manifest has no rows of gets "—": its languages are unknown
            cells = "".join(f" {by_lang[t].get(lang, 0):.0f} |" if by_lang[t] else " — |" for lang in langs)
            lines.append(f"| {t} | {s['seen'][t]} |{cells}")
        total = sum(s["seen"].values())
        cells = "".join(f" {sum(by_lang[t].get(lang, 0) for t in TASKS):.0f} |" for lang in langs) if langs else ""
        lines.append(f"| **all** | **{total}** |{cells}")
    return lines


def _mix_text(mix: Mapping[str, float]) -> str:
    total = sum(float(w) for w in mix.values()) or 1.0
    return ", ".join(f"{k} {float(w) / total:.2f}" for k, w in mix.items())


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _usage_lines(name: str, model: Mapping[str, Any], dims: Sequence[int], default_prompt: str | None) -> list[str]:
    small = (dims[-1] if dims else None) or 64
    return [
        "With vipoly installed (`pip install -e .` in its repository):", "",
        "```python", "from vipoly import PolyEmbedder", "",
        'model = PolyEmbedder.from_pretrained("MODEL_DIR").eval()',
        'q = model.encode(["Thủ đô của Việt Nam là gì?"], task="instr")         # (1, dim), unit rows',
        'd = model.encode(["Hà Nội là thủ đô của Việt Nam."], task="instr")',
        "print(float(q[0] @ d[0]))",
        'pair = model.encode(texts=["hóa đơn tiền điện"], images=["bill.png"])  # text+image',
        f'small = model.encode(["xin chào"], dim={small})                           # Matryoshka prefix, renormalised',
        "```", "",
        "With sentence-transformers (≥ 6; vipoly installed: the folder holds no code, but sentence-transformers "
        "asks for `trust_remote_code=True` before importing any module class outside its own package — here "
        "`vipoly.st.module.PolyModule` from site-packages; `vipoly.st.load(\"MODEL_DIR\")` builds the same model "
        "without the flag):", "",
        "```python", "from sentence_transformers import SentenceTransformer", "",
        'model = SentenceTransformer("MODEL_DIR", trust_remote_code=True)',
        'q = model.encode(["Thủ đô của Việt Nam là gì?"], prompt_name="instr")',
        'img = model.encode(["bill.png"])                     # a path to an image file is an image (or a PIL image)',
        'pair = model.encode([{"text": "hóa đơn tiền điện", "image": "bill.png"}])  # text+image',
        f'small = SentenceTransformer("MODEL_DIR", trust_remote_code=True, truncate_dim={small}).encode(["xin chào"])',
        "```", "",
        "Prompts are the task prefixes (`prompt_name=` one of " + ", ".join(f"`{t}`" for t in TASKS)
        + (f", or `query` / `document`, both `{default_prompt}`" if default_prompt else "") + ")"
        + (f"; with no prompt given, `{default_prompt}` applies (the training mix's main task)." if default_prompt
           else "; with no prompt given, none applies."),
        "`truncate_dim` keeps the first k dimensions without renormalising; cosine similarity (the default) "
        "or `normalize_embeddings=True` gives what `encode(..., dim=k)` gives."]


def _limitation_lines(demo: bool) -> list[str]:
    lines = []
    if demo:
        lines.append("- **A pipeline demonstration**: random-initialised tiny backbone, minutes of CPU training on "
                     "synthetic data; its retrieval numbers sit near chance and below BM25.")
    lines += [
        "- Trained for Vietnamese, English and Chinese; other languages are untested.",
        "- Use the same task prompt on both sides of a comparison; vectors made with different prompts or "
        "Matryoshka sizes are not comparable.",
        "- Inputs longer than the model's `max_length` tokens are truncated (text only; image tokens are never cut).",
        "- Image URLs are not fetched; pass files, bytes or PIL images. Audio and video are not supported.",
        "- The evaluation section reports what was measured here; check BM25's row before trusting a retrieval number.",
    ]
    return lines


# ---------------------------------------------------------------- read / check
def parse_card(path: str | Path) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a card; ValueError naming the file when it has no YAML front matter."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no model card (write one with `python -m vipoly.st add {path.parent} --card`)")
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{path}: no YAML front matter (the card must start with a '---' line)")
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError(f"{path}: the YAML front matter is not closed by a '---' line")
    try:
        front = yaml.safe_load(text[4:end]) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: the front matter is not valid YAML: {e}") from None
    if not isinstance(front, dict):
        raise ValueError(f"{path}: the front matter must be a mapping")
    return front, text[end + 5:]


def check_card(path: str | Path) -> dict[str, Any]:
    """The front matter of a complete card; ValueError naming the file and the missing key or section."""
    path = Path(path)
    front, body = parse_card(path)
    fix = f"; `python -m vipoly.st add {path.parent} --card` rewrites the card"
    missing = [k for k in FRONT_KEYS if front.get(k) in (None, "", [])]
    if missing:
        raise ValueError(f"{path}: front matter lacks key(s) {missing} (needed: {list(FRONT_KEYS)}){fix}")
    if front["pipeline_tag"] != "feature-extraction":
        raise ValueError(f"{path}: front matter key 'pipeline_tag' is {front['pipeline_tag']!r}, "
                         f"expected 'feature-extraction'{fix}")
    headings = {line[3:].strip() for line in body.splitlines() if line.startswith("## ")}
    absent = [s for s in SECTIONS if s not in headings]
    if absent:
        raise ValueError(f"{path}: missing section(s) {['## ' + s for s in absent]}{fix}")
    return front


def _existing_evaluation(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    start, end = text.find(EVAL_START), text.find(EVAL_END)
    return text[start + len(EVAL_START):end].strip() if 0 <= start < end else None


def _st_default(model_dir: Path) -> str | None:
    from vipoly.st import ST_CONFIG_FILE

    path = model_dir / ST_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("default_prompt_name")
    except json.JSONDecodeError:
        return None
