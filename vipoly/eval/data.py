"""Readers for the evaluation files: SQuAD JSON, line-aligned text, labels, STS, XNLI, canonical shards.

Each reader checks what it reads and fails with a ValueError that names the file (and the line or
column) instead of letting a malformed row turn into a silently wrong metric.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} not found: {p}")
    return p


# ------------------------------------------------------------------ SQuAD / XQuAD
@dataclass
class Squad:
    paragraphs: list[str]
    question_ids: list[str]
    questions: list[str]
    paragraph_of: np.ndarray  # (n_questions,) index into paragraphs


def load_squad(path: str | Path) -> Squad:
    """Questions and their paragraphs from a SQuAD-format JSON file (XQuAD uses this format)."""
    p = _existing(path, "SQuAD file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{p} is not SQuAD JSON (expected {{'data': [...]}}): {e}") from None
    paragraphs, ids, questions, owner = [], [], [], []
    for article in data:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                ids.append(str(qa["id"]))
                questions.append(qa["question"])
                owner.append(len(paragraphs))
            paragraphs.append(para["context"])
    if not questions:
        raise ValueError(f"{p} holds no questions")
    return Squad(paragraphs, ids, questions, np.asarray(owner, dtype=np.int64))


# ------------------------------------------------------------------ line-aligned text
def load_lines(path: str | Path) -> list[str]:
    """Lines of a text file without their line ends (\n or \r\n; NTREX uses \r\n). Only these two
    split lines: str.splitlines would also split at U+2028 or U+0085 inside a sentence and
    shift every later line out of alignment."""
    p = _existing(path, "text file")
    return [line.removesuffix("\r") for line in p.read_text(encoding="utf-8").removesuffix("\n").split("\n")]


def load_aligned(paths: list[str]) -> list[list[str]]:
    """Several line-aligned files; their line counts must agree."""
    sides = [load_lines(p) for p in paths]
    counts = {p: len(s) for p, s in zip(paths, sides)}
    if len(set(counts.values())) != 1:
        raise ValueError(f"line-aligned files differ in length: {counts}")
    return sides


def load_binary_labels(path: str | Path) -> np.ndarray:
    """One 0/1 label a line. Stray trailing punctuation is tolerated (vnPara's line 62 reads `1,`);
    anything else fails naming the line."""
    out = []
    for i, line in enumerate(load_lines(path), 1):
        value = line.strip().rstrip(",;.").strip()
        if value not in ("0", "1"):
            raise ValueError(f"{path}:{i}: expected a 0/1 label, got {line!r}")
        out.append(int(value))
    return np.asarray(out, dtype=np.int64)


# ------------------------------------------------------------------ graded pairs
@dataclass
class Pairs:
    s1: list[str]
    s2: list[str]
    score: np.ndarray  # graded (STS) or 0/1


def load_sts(path: str | Path) -> Pairs:
    """s1, s2, score from JSONL (keys s1, s2, score) or TSV (three columns, optional header)."""
    p = _existing(path, "STS file")
    s1, s2, score = [], [], []
    if p.suffix in (".jsonl", ".json"):
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in ("s1", "s2", "score") if k not in row]
            if missing:
                raise ValueError(f"{p}:{i}: missing key(s) {missing}")
            s1.append(row["s1"]), s2.append(row["s2"]), score.append(float(row["score"]))
    else:
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < 3:
                raise ValueError(f"{p}:{i}: expected s1<TAB>s2<TAB>score, got {len(cols)} column(s)")
            try:
                value = float(cols[2])
            except ValueError:
                if i == 1:  # a header line
                    continue
                raise ValueError(f"{p}:{i}: score {cols[2]!r} is not a number") from None
            s1.append(cols[0]), s2.append(cols[1]), score.append(value)
    if len(s1) < 2:
        raise ValueError(f"{p}: need at least 2 scored pairs, found {len(s1)}")
    return Pairs(s1, s2, np.asarray(score, dtype=np.float64))


XNLI_GRADE = {"contradiction": 0.0, "neutral": 0.5, "entailment": 1.0}


def load_xnli(path: str | Path) -> tuple[list[str], list[str], list[str]]:
    """premise, hypothesis, label columns of an XNLI TSV (no header)."""
    p = _existing(path, "XNLI file")
    prem, hyp, label = [], [], []
    for i, line in enumerate(load_lines(p), 1):
        cols = line.split("\t")
        if len(cols) != 3 or cols[2] not in XNLI_GRADE:
            raise ValueError(f"{p}:{i}: expected premise<TAB>hypothesis<TAB>{'|'.join(XNLI_GRADE)}")
        prem.append(cols[0]), hyp.append(cols[1]), label.append(cols[2])
    return prem, hyp, label


# ------------------------------------------------------------------ canonical shards
CANONICAL_COLUMNS = ("id", "task", "lang", "query_text", "query_images", "pos_text", "pos_images")


def load_canonical(root: str | Path) -> dict[str, pa.Table]:
    """{task: table} from ROOT/<task>/part-*.parquet, reading only the columns retrieval needs."""
    from vipoly.tasks import TASKS

    r = _existing(root, "canonical data directory")
    out = {}
    for task in TASKS:
        files = sorted((r / task).glob("part-*.parquet"))
        if not files:
            continue
        tables = []
        for f in files:
            names = pq.read_schema(f).names
            missing = [c for c in CANONICAL_COLUMNS if c not in names]
            if missing:
                raise ValueError(f"{f}: missing canonical column(s) {missing}")
            tables.append(pq.read_table(f, columns=list(CANONICAL_COLUMNS)))
        out[task] = pa.concat_tables(tables, promote_options="default")
    if not out:
        raise ValueError(f"no shards found under {r} (expected <task>/part-*.parquet)")
    return out
