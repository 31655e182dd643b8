"""Source formats → canonical rows.

A conversion is planned as *units* (a file, a group of aligned files, or a row range of a Hugging
Face folder) so that a Ray Data stage can convert units in parallel; `convert_unit` turns one unit
into staging rows: canonical fields plus `_source` ("file:line" for the quarantine report) and
`_order` (global input order, used to keep the first of two rows with the same id). A row that
cannot even be built (a line that is not JSON, a label that is no label, an image path that does
not exist) is still yielded, with `_reason` set, so that it reaches the quarantine instead of
vanishing.

Formats
  canonical  JSONL / JSON array / Parquet in the canonical schema. Images: bytes (Parquet), base64
             strings, `data:` URIs, or paths relative to the input file. `--task/--lang` fill
             rows that lack them.
  squad      SQuAD-style JSON: one row per question, query = question, positive = its paragraph
             (default task `instr`). The row id is `<question id>-<lang>`, because XQuAD gives the
             same question ids in every language.
  parallel   two or three line-aligned files in different languages (all inputs form one group):
             one row per line and language pair, score 1.0 (bitext: both sides say the same).
  pairs      vnPara-style: two line-aligned sentence files and a label file (three inputs, or a
             folder holding Sentences1.txt, Sentences2.txt, Labels.txt); or TSV files with
             sentence1<TAB>sentence2<TAB>label (XNLI). Labels are scores in [0, 1] or NLI names
             (entailment 1.0, neutral 0.5, contradiction 0.0). A label with trailing punctuation
             (vnPara's line 62 reads `1,`) is read as the label when what remains is unambiguous.
  hf         a Hugging Face `datasets` folder written by `save_to_disk` (`--columns` maps canonical
             fields to its columns; Image features are read as bytes).
"""
from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from vipoly.data.schema import COLUMNS, ORDER, ORDER_STRIDE, REASON, SOURCE, make_row
from vipoly.tasks import LANGS, check_task

FORMATS = ("canonical", "squad", "parallel", "pairs", "hf")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
DEFAULT_TASK = {"canonical": None, "squad": "instr", "parallel": "text_pair", "pairs": "text_pair", "hf": None}
NLI_SCORES = {"entailment": 1.0, "neutral": 0.5, "contradiction": 0.0}
HF_CHUNK_ROWS = 10_000


@dataclass
class ConvertOptions:
    """What a format cannot know by itself: the task and language of its rows, and mappings."""

    task: str | None = None
    """Task of every converted row (canonical/hf: only rows without one); None = the format's default."""
    lang: str | None = None
    """Language of every row; None = from the file name (xquad.vi.json, ref.vie.txt), else guessed from the text."""
    langs: list[str] | None = None
    """parallel: language of each input file, in order; None = from the file names."""
    columns: dict[str, str] = field(default_factory=dict)
    """canonical/hf: {canonical field: source column}."""
    split: str | None = None
    """hf: the split of a DatasetDict to read; None = all splits."""
    labels: dict[str, float] = field(default_factory=dict)
    """pairs: extra label → score entries (beside numbers and the NLI names)."""
    negatives: int = 0
    """squad: up to N other paragraphs of the question's article as its hard negatives (neg_text),
    the ones after its own, in order; 0 = none."""

    def __post_init__(self):
        check_task(self.task)
        for lang in [self.lang, *(self.langs or [])]:
            if lang is not None and lang not in LANGS:
                raise ValueError(f"unknown lang {lang!r}; expected one of {', '.join(LANGS)}")
        unknown = set(self.columns) - set(COLUMNS)
        if unknown:
            raise ValueError(f"--columns: unknown canonical field(s) {sorted(unknown)}; expected {list(COLUMNS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- languages
_NAME_LANGS = {"vi": "vi", "vie": "vi", "vietnamese": "vi", "en": "en", "eng": "en", "english": "en",
               "zh": "zh", "zho": "zh", "cmn": "zh", "chinese": "zh"}
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
# Letters found in Vietnamese and (almost) nowhere else; and the whole Vietnamese set of accented letters.
_VI = re.compile(r"[ăđơưĂĐƠƯ\u1ea0-\u1ef9]")
_VI_LETTERS = set("àáâãèéêìíòóôõùúýăđĩũơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ")


def lang_from_name(path: str | Path) -> str | None:
    """'xquad.vi.json' → 'vi', 'newstest2019-ref.zho-CN.txt' → 'zh', 'dev-en.tsv' → 'en'."""
    for token in reversed(re.split(r"[._\-/]", Path(path).name.lower())):
        if token in _NAME_LANGS:
            return _NAME_LANGS[token]
    return None


def guess_lang(text: str | None) -> str:
    """A script-based guess: Han characters → zh, Vietnamese letters → vi, ASCII → en, else other."""
    if not text:
        return "other"
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "other"
    if len(_CJK.findall(text)) >= 0.3 * len(letters):
        return "zh"
    if _VI.search(text):
        return "vi"
    accented = {c.lower() for c in letters if not c.isascii()}
    if not accented:
        return "en"
    return "vi" if accented <= _VI_LETTERS else "other"


def _lang_for(path: Path, opts: ConvertOptions, sample: str | None) -> str:
    return opts.lang or lang_from_name(path) or guess_lang(sample)


# ---------------------------------------------------------------- images
def load_image_ref(value: Any, base_dir: Path) -> tuple[bytes | None, str | None]:
    """Image bytes from what a source may hold: bytes, {bytes, path}, a data: URI, a path
    relative to `base_dir`, or a base64 string. Returns (bytes, None) or (None, reason)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, dict):  # Hugging Face Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"]), None
        value = value.get("path")
    if not isinstance(value, str) or not value:
        return None, f"neither bytes nor a string ({type(value).__name__})"
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    elif len(value) < 4096:
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if path.is_file():
            return path.read_bytes(), None
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return None, f"image file not found: {path}"
    try:
        return base64.b64decode(value, validate=True), None
    except (binascii.Error, ValueError):
        return None, "image string is neither base64 nor an existing path"


# ---------------------------------------------------------------- units
def plan_units(fmt: str, inputs: list[str], opts: ConvertOptions) -> list[dict[str, Any]]:
    """Split the inputs into independently convertible units (JSON-able dicts)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise ValueError(f"input not found: {p}")
    if fmt == "canonical":
        files = []
        for p in paths:
            files += sorted(q for q in p.rglob("*") if q.suffix in (".jsonl", ".json", ".parquet")) if p.is_dir() else [p]
        return [{"fmt": fmt, "paths": [str(f)], "index": i} for i, f in enumerate(files)]
    if fmt == "squad":
        return [{"fmt": fmt, "paths": [str(p)], "index": i} for i, p in enumerate(paths)]
    if fmt == "parallel":
        if not 2 <= len(paths) <= 3:
            raise ValueError(f"parallel: expected 2 or 3 line-aligned files, got {len(paths)}")
        _aligned_lengths(paths)
        return [{"fmt": fmt, "paths": [str(p) for p in paths], "index": 0}]
    if fmt == "pairs":
        return _plan_pairs(paths)
    return _plan_hf(paths, opts)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _aligned_lengths(paths: list[Path]) -> int:
    counts = {str(p): _count_lines(p) for p in paths}
    if len(set(counts.values())) != 1:
        raise ValueError(f"line-aligned files differ in length: {counts}")
    return next(iter(counts.values()))


def _plan_pairs(paths: list[Path]) -> list[dict[str, Any]]:
    if len(paths) == 1 and paths[0].is_dir():
        names = ("Sentences1.txt", "Sentences2.txt", "Labels.txt")
        missing = [n for n in names if not (paths[0] / n).is_file()]
        if missing:
            raise ValueError(f"pairs: folder {paths[0]} lacks {missing}")
        paths = [paths[0] / n for n in names]
    if all(p.suffix == ".tsv" for p in paths):
        return [{"fmt": "pairs", "paths": [str(p)], "index": i} for i, p in enumerate(paths)]
    if len(paths) != 3:
        raise ValueError("pairs: expected sentence1 file, sentence2 file and label file (or .tsv files), "
                         f"got {[str(p) for p in paths]}")
    _aligned_lengths(paths)
    return [{"fmt": "pairs", "paths": [str(p) for p in paths], "index": 0}]


def _plan_hf(paths: list[Path], opts: ConvertOptions) -> list[dict[str, Any]]:
    import datasets

    units = []
    for i, p in enumerate(paths):
        loaded = datasets.load_from_disk(str(p))
        splits = {None: loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
        if opts.split is not None:
            if opts.split not in splits:
                raise ValueError(f"hf: {p} has no split {opts.split!r} (has {list(splits)})")
            splits = {opts.split: splits[opts.split]}
        for j, (name, ds) in enumerate(splits.items()):
            for start in range(0, max(len(ds), 1), HF_CHUNK_ROWS):
                units.append({"fmt": "hf", "paths": [str(p)], "index": i, "split": name, "sub": j,
                              "start": start, "stop": min(start + HF_CHUNK_ROWS, len(ds))})
    return units


# ---------------------------------------------------------------- conversion
def convert_unit(unit: dict[str, Any], opts: ConvertOptions) -> Iterator[dict[str, Any]]:
    """Staging rows of one unit (see the module docstring)."""
    fn = {"canonical": _canonical, "squad": _squad, "parallel": _parallel, "pairs": _pairs, "hf": _hf}[unit["fmt"]]
    task = opts.task or DEFAULT_TASK[unit["fmt"]]
    for n, row in enumerate(fn(unit, opts, task)):
        row.setdefault(ORDER, unit["index"] * ORDER_STRIDE + n)
        yield row


def _staged(source: str, reason: str | None = None, **fields: Any) -> dict[str, Any]:
    row = make_row(**fields)
    row[SOURCE] = source
    row[REASON] = reason
    return row


def _pair_score(task: str | None, score: float | None = 1.0) -> float | None:
    """A converted positive pair is a perfect match; only text_pair rows carry the score."""
    return score if task == "text_pair" else None


def _mapped(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k in COLUMNS}
    for canonical, source in columns.items():
        out[canonical] = record.get(source)
    return out


def _canonical_fields(rec: dict[str, Any], base: Path, opts: ConvertOptions, task: str | None,
                      source: str) -> dict[str, Any]:
    """One source record → staging row: mapping, defaults, image references resolved."""
    rec = _mapped(rec, opts.columns)
    rec.setdefault("task", None)
    rec["task"] = rec["task"] or task
    rec["lang"] = rec.get("lang") or opts.lang or guess_lang(rec.get("query_text") or rec.get("pos_text"))
    reason = None
    for name in ("query_images", "pos_images"):
        value = rec.get(name)
        if value is None:
            rec[name] = []
            continue
        images = []
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            data, err = load_image_ref(ref, base)
            if err and reason is None:
                reason = f"bad image reference: {name}: {err}"
            images.append(data)
        rec[name] = images if reason is None else []
    negs = rec.get("neg_text")
    rec["neg_text"] = [negs] if isinstance(negs, str) else list(negs or [])
    if rec.get("id") is not None:
        rec["id"] = str(rec["id"])
    return _staged(source, reason, **rec)


def _canonical(unit, opts, task) -> Iterator[dict[str, Any]]:
    path = Path(unit["paths"][0])
    base = path.parent
    if path.suffix == ".parquet":
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                n += 1
                yield _canonical_fields(rec, base, opts, task, f"{path}:{n}")
        return
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        for n, rec in enumerate(records, 1):
            if not isinstance(rec, dict):
                yield _staged(f"{path}:{n}", f"bad record: record {n} is not an object")
            else:
                yield _canonical_fields(rec, base, opts, task, f"{path}:{n}")
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield _staged(f"{path}:{n}", f"bad record: line {n} is not valid JSON: {e.msg}")
            continue
        if not isinstance(rec, dict):
            yield _staged(f"{path}:{n}", f"bad record: line {n} is not a JSON object")
            continue
        yield _canonical_fields(rec, base, opts, task, f"{path}:{n}")


def _squad(unit, opts, task) -> Iterator[dict[str, Any]]:
    path = Path(unit["paths"][0])
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        articles = doc["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not SQuAD JSON (expected {{'data': [...]}}): {e}") from None
    lang = None
    n = 0
    for article in articles:
        paragraphs = article.get("paragraphs", [])
        contexts = [p.get("context") for p in paragraphs]
        for at, paragraph in enumerate(paragraphs):
            context = paragraph.get("context")
            others = [c for c in contexts[at + 1:] + contexts[:at] if c and c != context][:opts.negatives]
            for qa in paragraph.get("qas", []):
                n += 1
                lang = lang or _lang_for(path, opts, qa.get("question") or context)
                qid = qa.get("id")
                source = f"{path}:question {n}"
                if qa.get("is_impossible"):
                    yield _staged(source, "unanswerable question: SQuAD 2.0 is_impossible",
                                  id=f"{qid}-{lang}", task=task, lang=lang)
                    continue
                yield _staged(source, None if qid else "missing id",
                              id=f"{qid}-{lang}" if qid else None, task=task, lang=lang,
                              query_text=qa.get("question"), pos_text=context, score=_pair_score(task),
                              neg_text=others)


def _read_lines(path: Path) -> list[str]:
    # Split on "\n" only: str.splitlines would also split on U+2028 and the like inside a sentence
    # and break the alignment.
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _parallel(unit, opts, task) -> Iterator[dict[str, Any]]:
    paths = [Path(p) for p in unit["paths"]]
    texts = [_read_lines(p) for p in paths]
    langs = opts.langs or [lang_from_name(p) or guess_lang(" ".join(t[:20])) for p, t in zip(paths, texts)]
    if len(langs) != len(paths):
        raise ValueError(f"parallel: {len(paths)} files but {len(langs)} languages ({langs})")
    if len(set(langs)) != len(langs):
        raise ValueError(f"parallel: the files' languages must differ, got {dict(zip(map(str, paths), langs))}"
                         " (pass --langs)")
    stem = paths[0].stem.split(".")[0].split("-")[0]
    pairs = list(itertools.combinations(range(len(paths)), 2))
    for n, line in enumerate(zip(*texts), 1):
        for a, b in pairs:
            yield _staged(f"{paths[a]}:{n}", id=f"{stem}:{n}:{langs[a]}-{langs[b]}", task=task, lang=langs[a],
                          query_text=line[a], pos_text=line[b], score=_pair_score(task))


def parse_label(raw: str, extra: dict[str, float] | None = None) -> tuple[float | None, str | None]:
    """A label → (score, None) or (None, reason). Numbers in [0, 1], NLI names, `extra` names; one
    trailing run of `,;.` and surrounding spaces is forgiven ("1," → 1.0), nothing else is."""
    table = {**NLI_SCORES, **(extra or {})}

    def read(s: str) -> float | None:
        if s in table:
            return float(table[s])
        try:
            return float(s)
        except ValueError:
            return None

    text = raw.strip()
    score = read(text)
    if score is None:
        score = read(text.rstrip(",;.").strip())
    if score is None:
        return None, f"bad label: {raw!r} is neither a number nor one of {sorted(table)}"
    return score, None


def _pairs(unit, opts, task) -> Iterator[dict[str, Any]]:
    paths = [Path(p) for p in unit["paths"]]
    if len(paths) == 1:  # TSV: sentence1, sentence2, label
        path = paths[0]
        lines = _read_lines(path)
        lang = _lang_for(path, opts, " ".join(lines[:20]))
        for n, line in enumerate(lines, 1):
            cols = line.split("\t")
            source = f"{path}:{n}"
            if len(cols) != 3:
                yield _staged(source, f"bad record: line {n} has {len(cols)} tab-separated fields, expected 3")
                continue
            score, reason = parse_label(cols[2], opts.labels)
            yield _staged(source, reason, id=f"{path.stem}:{n}", task=task, lang=lang,
                          query_text=cols[0], pos_text=cols[1], score=score if task == "text_pair" else None)
        return
    s1, s2, labels = (_read_lines(p) for p in paths)
    lang = _lang_for(paths[0], opts, " ".join(s1[:20]))
    stem = paths[0].parent.name or paths[0].stem
    for n, (a, b, label) in enumerate(zip(s1, s2, labels), 1):
        score, reason = parse_label(label, opts.labels)
        yield _staged(f"{paths[2]}:{n}", reason, id=f"{stem}:{n}", task=task, lang=lang,
                      query_text=a, pos_text=b, score=score if task == "text_pair" else None)


def _hf(unit, opts, task) -> Iterator[dict[str, Any]]:
    import datasets

    path = Path(unit["paths"][0])
    loaded = datasets.load_from_disk(str(path))
    ds = loaded if unit["split"] is None else loaded[unit["split"]]
    # Image features would decode to PIL objects; ask for the stored bytes instead.
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.Sequence, datasets.List)) and isinstance(feature.feature, datasets.Image):
            ds = ds.cast_column(name, type(feature)(datasets.Image(decode=False)))
    split = unit["split"] or "data"
    for n in range(unit["start"], unit["stop"]):
        row = _canonical_fields(ds[n], path, opts, task, f"{path}[{split}]:{n}")
        if row["id"] is None:
            row["id"] = f"{path.name}:{split}:{n}"
        row[ORDER] = unit["index"] * ORDER_STRIDE + unit["sub"] * (ORDER_STRIDE >> 8) + n
        yield row
