"""Evaluation suites: parse a spec string, run it against a model, return result records.

A spec names a kind and its files, e.g. `retrieval:squad:xquad.vi.json` or `bitext:a.txt,b.txt`.
Every suite returns `Result`s with the number of queries and the corpus size beside the metrics,
and every text suite also scores BM25 on the same items: the lexical bar a model must clear.

`--limit N` keeps N queries (pairs, lines, rows) drawn with a fixed seed. For SQuAD retrieval the
corpus stays whole (every paragraph of the file) so a limited run stays as hard as a full one; for
the other suites the items and their counterparts are sampled together, and the corpus size in the
report says how large the search space was.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from vipoly.eval import data as D
from vipoly.eval import metrics as M
from vipoly.eval.bm25 import BM25
from vipoly.tasks import check_task

TOP_K = 10


class Encoder(Protocol):
    def encode(self, texts=None, images=None, task=None, batch_size=32, dim=None, show_progress=False) -> np.ndarray: ...


@dataclass
class Options:
    task: str | None = None
    """Task prefix for non-canonical suites (canonical shards use each row's own task)."""
    batch_size: int = 32
    limit: int | None = None
    seed: int = 0
    examples: int = 0
    """Nearest-neighbour examples to keep per retrieval suite (0 = none)."""
    dim: int | None = None
    """Matryoshka truncation of the embeddings (None = the model's full size)."""
    progress: bool = False
    cache: dict = field(default_factory=dict, repr=False)
    """{(task, dim): {text: vector}} shared by the suites of one run."""


@dataclass
class Result:
    suite: str
    kind: str
    name: str
    n_queries: int
    corpus_size: int
    metrics: dict[str, dict[str, float]]
    """{system: {metric: value}}; systems are `model` and, for text suites, `bm25`."""
    seconds: float = 0.0
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Item:
    """One thing to embed: a text, an image (encoded bytes), or both."""

    text: str | None = None
    image: bytes | None = None

    def key(self) -> tuple[str, str]:
        digest = hashlib.sha1(self.image).hexdigest() if self.image else ""
        return (self.text or "", digest)

    def show(self, width: int = 160) -> str:
        text = " ".join((self.text or "").split())
        text = text if len(text) <= width else text[: width - 1] + "…"
        return ("[image] " if self.image else "") + text


@dataclass
class SuiteOutput:
    results: list[Result] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    """Markdown sections of nearest-neighbour examples."""
    images: list[tuple[str, Item, str | None]] = field(default_factory=list)
    """(label, item, task) of image inputs met by the suite, for pooling heat maps."""


# ------------------------------------------------------------------ encoding helpers
def encode_texts(model: Encoder, texts: Sequence[str], task: str | None, opts: Options) -> np.ndarray:
    """Embed texts, reusing vectors already computed in this run (XQuAD's vi→vi, en→vi and zh→vi
    suites share one corpus; a text's vector does not depend on its batch)."""
    key = (task, opts.dim)
    cache = opts.cache.setdefault(key, {})
    todo = list(dict.fromkeys(t for t in texts if t not in cache))
    if todo:
        emb = np.asarray(model.encode(texts=todo, task=task, batch_size=opts.batch_size, dim=opts.dim,
                                      show_progress=opts.progress), dtype=np.float32)
        cache.update(zip(todo, emb))
    return np.stack([cache[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)


def encode_items(model: Encoder, items: Sequence[Item], task: str | None, opts: Options) -> np.ndarray:
    """Embed a mix of text, image and text+image items: one encode call per kind, rows in order."""
    groups: dict[tuple[bool, bool], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((it.text is not None and it.text != "", it.image is not None), []).append(i)
    out: np.ndarray | None = None
    for (has_text, has_image), idx in groups.items():
        if not has_text and not has_image:
            raise ValueError(f"item {idx[0]} has neither text nor image")
        texts = [items[i].text for i in idx] if has_text else None
        if not has_image:
            emb = encode_texts(model, texts, task, opts)
        else:
            images = [items[i].image for i in idx]  # encoded bytes: encode decodes them
            emb = np.asarray(model.encode(texts=texts, images=images, task=task, batch_size=opts.batch_size,
                                          dim=opts.dim, show_progress=opts.progress), dtype=np.float32)
        if out is None:
            out = np.empty((len(items), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
    assert out is not None, "no items to encode"
    return out


def sample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of `limit` of n items (all of them when limit is None or ≥ n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _stem(path: str) -> str:
    return Path(path).name.removesuffix(".json").removesuffix(".txt").removesuffix(".tsv")


def _examples_md(title: str, queries: Sequence[Item], docs: Sequence[Item], ranked: np.ndarray,
                 scores: np.ndarray, relevant: Sequence[Sequence[int]], k: int, shown: int = 3) -> str:
    lines = [f"### {title}", ""]
    for q in range(min(k, len(queries))):
        gold = set(int(g) for g in relevant[q])
        lines.append(f"**Q{q + 1}.** {queries[q].show()}")
        for r in range(min(shown, ranked.shape[1])):
            d = int(ranked[q, r])
            mark = "✓" if d in gold else "✗"
            lines.append(f"{r + 1}. {mark} `{scores[q, r]:.3f}` {docs[d].show(120)}")
        if not gold & set(ranked[q, :shown].tolist()):
            first_gold = next(iter(sorted(gold)))
            lines.append(f"- gold: {docs[first_gold].show(120)}")
        lines.append("")
    return "\n".join(lines)


def _retrieve(q_emb: np.ndarray, d_emb: np.ndarray, relevant) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    ranked, scores = M.rank_top_k(q_emb, d_emb, TOP_K)
    return M.retrieval_metrics(ranked, relevant), ranked, scores


def _bm25_retrieve(queries: Sequence[str], docs: Sequence[str], relevant) -> dict[str, float]:
    ranked, _ = M.top_k_of_scores(BM25(docs).scores(queries), TOP_K)
    return M.retrieval_metrics(ranked, relevant)


def _pair_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    acc, theta = M.best_threshold_accuracy(scores, labels)
    return {"AP": M.average_precision(scores, labels), "accuracy": acc, "threshold": theta}


# ------------------------------------------------------------------ suites
class Suite:
    kind = ""

    def __init__(self, spec: str):
        self.spec = spec

    def _checked_paths(self, paths: list[str], count_ok: bool, usage: str, what: str) -> list[str]:
        """`paths`, once their number fits `usage` and each exists (errors name the spec or file)."""
        if not count_ok:
            raise ValueError(f"{self.spec}: expected {usage}")
        for p in paths:
            D._existing(p, what)
        return paths

    def run(self, model: Encoder, opts: Options) -> SuiteOutput:
        raise NotImplementedError


class SquadRetrieval(Suite):
    """Every question retrieves its own paragraph among all paragraphs of the file.

    With a second file, the queries come from it and the paragraphs from the first, matched by
    question id (XQuAD's languages share ids), which measures cross-lingual retrieval.
    """

    kind = "retrieval"

    def __init__(self, spec: str, paths: list[str]):
        super().__init__(spec)
        self.paths = self._checked_paths(paths, len(paths) in (1, 2),
                                         "retrieval:squad:PATH[,QUERY_PATH]", "SQuAD file")

    def run(self, model: Encoder, opts: Options) -> SuiteOutput:
        t0 = time.perf_counter()
        corpus = D.load_squad(self.paths[0])
        name = _stem(self.paths[0])
        questions, gold, notes = corpus.questions, corpus.paragraph_of, ""
        if len(self.paths) == 2:
            other = D.load_squad(self.paths[1])
            where = dict(zip(corpus.question_ids, corpus.paragraph_of.tolist()))
            keep = [i for i, qid in enumerate(other.question_ids) if qid in where]
            if not keep:
                raise ValueError(f"{self.paths[1]} shares no question id with {self.paths[0]}")
            if len(keep) < len(other.question_ids):
                notes = f"{len(other.question_ids) - len(keep)} query ids absent from the corpus file were skipped"
            questions = [other.questions[i] for i in keep]
            gold = np.asarray([where[other.question_ids[i]] for i in keep], dtype=np.int64)
            name = f"{_stem(self.paths[1])} → {name}"
        sel = sample(len(questions), opts.limit, opts.seed)
        q_text = [questions[i] for i in sel]
        gold = gold[sel]
        task = opts.task
        q_emb = encode_texts(model, q_text, task, opts)
        d_emb = encode_texts(model, corpus.paragraphs, task, opts)
        model_m, ranked, scores = _retrieve(q_emb, d_emb, gold)
        bm25_m = _bm25_retrieve(q_text, corpus.paragraphs, gold)
        out = SuiteOutput([Result(self.spec, self.kind, name, len(sel), len(corpus.paragraphs),
                                  {"model": model_m, "bm25": bm25_m}, time.perf_counter() - t0, notes)])
        if opts.examples:
            out.examples.append(_examples_md(name, [Item(t) for t in q_text], [Item(p) for p in corpus.paragraphs],
                                             ranked, scores, gold[:, None], opts.examples))
        return out


class Bitext(Suite):
    """Line-aligned translations: for every pair of files, does line i find line i (both ways)?"""

    kind = "bitext"

    def __init__(self, spec: str, paths: list[str]):
        super().__init__(spec)
        self.paths = self._checked_paths(paths, len(paths) >= 2,
                                         "bitext:A,B[,C...] (at least two line-aligned files)", "bitext file")

    def run(self, model: Encoder, opts: Options) -> SuiteOutput:
        t0 = time.perf_counter()
        sides = D.load_aligned(self.paths)
        sel = sample(len(sides[0]), opts.limit, opts.seed)
        sides = [[s[i] for i in sel] for s in sides]
        emb = [encode_texts(model, s, opts.task, opts) for s in sides]
        out = SuiteOutput()
        for a, b in combinations(range(len(sides)), 2):
            na, nb = _stem(self.paths[a]), _stem(self.paths[b])
            ab, ba = M.bitext_accuracy(emb[a], emb[b])
            # BM25 is asymmetric: index the target side for each direction
            bm_ab = float(np.mean(BM25(sides[b]).scores(sides[a]).argmax(1) == np.arange(len(sel))))
            bm_ba = float(np.mean(BM25(sides[a]).scores(sides[b]).argmax(1) == np.arange(len(sel))))
            out.results.append(Result(
                self.spec, self.kind, f"{na} ↔ {nb}", len(sel), len(sel),
                {"model": {"acc →": ab, "acc ←": ba, "acc mean": (ab + ba) / 2},
                 "bm25": {"acc →": bm_ab, "acc ←": bm_ba, "acc mean": (bm_ab + bm_ba) / 2}},
                time.perf_counter() - t0))
        return out


class PairClassification(Suite):
    """Sentence pairs labelled 1 (paraphrase) / 0: AP of the cosine and best-threshold accuracy."""

    kind = "pairs"

    def __init__(self, spec: str, paths: list[str]):
        super().__init__(spec)
        self.paths = self._checked_paths(paths, len(paths) == 3,
                                         "pairs:S1,S2,LABELS", "pairs file")

    def run(self, model: Encoder, opts: Options) -> SuiteOutput:
        t0 = time.perf_counter()
        s1, s2 = D.load_aligned(self.paths[:2])
        labels = D.load_binary_labels(self.paths[2])
        if len(labels) != len(s1):
            raise ValueError(f"{self.paths[2]} has {len(labels)} labels for {len(s1)} pairs in {self.paths[0]}")
        sel = sample(len(s1), opts.limit, opts.seed)
        a = [s1[i] for i in sel]
        b = [s2[i] for i in sel]
        y = labels[sel]
        cos = (encode_texts(model, a, opts.task, opts) * encode_texts(model, b, opts.task, opts)).sum(1)
        bm = BM25(b).pair_scores(a, np.arange(len(b)))
        name = Path(self.paths[0]).parent.name or _stem(self.paths[0])
        return SuiteOutput([Result(self.spec, self.kind, name, len(sel), len(sel),
                                   {"model": _pair_metrics(cos, y), "bm25": _pair_metrics(bm, y)},
                                   time.perf_counter() - t0, f"{int(y.sum())} positive of {len(y)}")])


class STS(Suite):
    """Graded similarity: Spearman between the cosine and the gold score."""

    kind = "sts"

    def __init__(self, spec: str, path: str):
        super().__init__(spec)
        D._existing(path, "STS file")
        self.path = path

    def run(self, model: Encoder, opts: Options) -> SuiteOutput:
        t0 = time.perf_counter()
        pairs = D.load_sts(self.path)
        sel = sample(len(pairs.s1), opts.limit, opts.seed)
        a, b, gold = [pairs.s1[i] for i in sel], [pairs.s2[i] for i in sel], pairs.score[sel]
        cos = (encode_texts(model, a, opts.task, opts) * encode_texts(model, b, opts.task, opts)).sum(1)
        bm = BM25(b).pair_scores(a, np.arange(len(b)))
        return SuiteOutput([Result(self.spec, self.kind, _stem(self.path), len(sel), len(sel),
                                   {"model": {"spearman": M.spearman(cos, gold)},
                                    "bm25": {"spearman": M.spearman(bm, gold)}}, time.perf_counter() - t0)])


class XNLI(Suite):
    """Entailment as similarity: premise·hypothesis cosine against the label.

    spearman: against the grade contradiction 0 / neutral 0.5 / entailment 1; AP: entailment vs the
    rest; accuracy: best threshold separating entailment from contradiction (neutral left out).
    With a second file, hypotheses come from it (line-aligned), a cross-lingual variant.
    """

    kind = "xnli"

    def __init__(self, spec: str, paths: list[str]):
        super().__init__(spec)
        self.paths = self._checked_paths(paths, len(paths) in (1, 2),
                                         "xnli:PATH[,HYPOTHESIS_PATH]", "XNLI file")

    def run(self, model: Encoder, opts: Options) -> SuiteOutput:
        t0 = time.perf_counter()
        prem, hyp, label = D.load_xnli(self.paths[0])
        name = _stem(self.paths[0])
        if len(self.paths) == 2:
            _, hyp, label2 = D.load_xnli(self.paths[1])
            if label2 != label:
                raise ValueError(f"{self.paths[1]} is not line-aligned with {self.paths[0]} (labels differ)")
            name = f"{name} × {_stem(self.paths[1])}"
        sel = sample(len(prem), opts.limit, opts.seed)
        a, b = [prem[i] for i in sel], [hyp[i] for i in sel]
        lab = [label[i] for i in sel]
        cos = (encode_texts(model, a, opts.task, opts) * encode_texts(model, b, opts.task, opts)).sum(1)
        systems = {"model": cos}
        if len(self.paths) == 1:  # lexical overlap across languages says little
            systems["bm25"] = BM25(b).pair_scores(a, np.arange(len(b)))
        grade = np.asarray([D.XNLI_GRADE[x] for x in lab])
        entail = (grade == 1.0).astype(np.int64)
        decided = grade != 0.5
        metrics = {}
        for system, s in systems.items():
            acc, _ = M.best_threshold_accuracy(s[decided], entail[decided])
            metrics[system] = {"spearman": M.spearman(s, grade), "AP entail": M.average_precision(s, entail),
                               "accuracy E/C": acc}
        return SuiteOutput([Result(self.spec, self.kind, name, len(sel), len(sel), metrics, time.perf_counter() - t0)])


class Canonical(Suite):
    """Prepared shards: query → positive retrieval per task, over all rows and per language.

    Identical positives are one document and identical queries one query (whose relevant set is
    every positive it was paired with), so duplicates neither split credit nor count as misses.
    Per-language rows search only that language's documents. BM25 runs where both sides are text.
    """

    kind = "canonical"

    def __init__(self, spec: str, root: str):
        super().__init__(spec)
        D._existing(root, "canonical data directory")
        self.root = root

    def run(self, model: Encoder, opts: Options) -> SuiteOutput:
        out = SuiteOutput()
        for task, table in D.load_canonical(self.root).items():
            t0 = time.perf_counter()
            sel = sample(table.num_rows, opts.limit, opts.seed)
            cols = {c: table.column(c).take(sel).to_pylist() for c in D.CANONICAL_COLUMNS}
            queries = [Item(t or None, (imgs or [None])[0]) for t, imgs in zip(cols["query_text"], cols["query_images"])]
            docs = [Item(t or None, (imgs or [None])[0]) for t, imgs in zip(cols["pos_text"], cols["pos_images"])]
            first_q, row_q = _unique([q.key() for q in queries])
            first_d, row_d = _unique([d.key() for d in docs])
            uq, ud = [queries[i] for i in first_q], [docs[i] for i in first_d]
            q_emb = encode_items(model, uq, task, opts)
            d_emb = encode_items(model, ud, task, opts)
            langs = np.asarray(cols["lang"])
            groups = [("all", np.arange(len(sel)))] + [(lang, np.flatnonzero(langs == lang)) for lang in sorted(set(langs))]
            if len(groups) == 2:  # one language: "all" already is it
                groups = groups[1:]
            for lang, rows in groups:
                qs, ds, relevant = _subset(row_q[rows], row_d[rows])
                model_m, ranked, scores = _retrieve(q_emb[qs], d_emb[ds], relevant)
                metrics = {"model": model_m}
                text_only = all(uq[i].text and uq[i].image is None for i in qs) and all(ud[i].text and ud[i].image is None for i in ds)
                notes = ""
                if text_only:
                    metrics["bm25"] = _bm25_retrieve([uq[i].text for i in qs], [ud[i].text for i in ds], relevant)
                else:
                    notes = "BM25 n/a: images on one side"
                name = f"{task}/{lang}"
                out.results.append(Result(self.spec, self.kind, name, len(qs), len(ds), metrics,
                                          time.perf_counter() - t0, notes))
                if opts.examples and lang == groups[0][0]:
                    out.examples.append(_examples_md(f"canonical {name}", [uq[i] for i in qs], [ud[i] for i in ds],
                                                     ranked, scores, relevant, opts.examples))
            for label, items in (("query", uq), ("positive", ud)):
                first = next((it for it in items if it.image is not None), None)
                if first is not None:
                    out.images.append((f"{task}-{label}", first, task))
        return out


def _unique(keys: list[tuple]) -> tuple[list[int], np.ndarray]:
    """The row of each distinct key's first occurrence, and each row's index into the distinct keys."""
    index: dict[tuple, int] = {}
    first: list[int] = []
    rows = np.empty(len(keys), dtype=np.int64)
    for r, k in enumerate(keys):
        if k not in index:
            index[k] = len(first)
            first.append(r)
        rows[r] = index[k]
    return first, rows


def _subset(row_q: np.ndarray, row_d: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Queries and documents used by some rows, with each query's relevant documents re-indexed."""
    qs, q_local = np.unique(row_q, return_inverse=True)
    ds, d_local = np.unique(row_d, return_inverse=True)
    relevant: list[set[int]] = [set() for _ in qs]
    for q, d in zip(q_local, d_local):
        relevant[q].add(int(d))
    return qs, ds, [sorted(r) for r in relevant]


# ------------------------------------------------------------------ parsing
def parse_suite(spec: str) -> Suite:
    """`kind:args` → a Suite; file paths are checked here, before any model work starts."""
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"suite {spec!r}: expected KIND:ARGS (retrieval:squad:PATH, bitext:A,B, pairs:S1,S2,LABELS, "
                         "sts:FILE, xnli:PATH, canonical:DIR)")
    if kind == "retrieval":
        fmt, _, paths = rest.partition(":")
        if fmt != "squad" or not paths:
            raise ValueError(f"suite {spec!r}: only retrieval:squad:PATH[,QUERY_PATH] is supported")
        return SquadRetrieval(spec, paths.split(","))
    if kind == "bitext":
        return Bitext(spec, rest.split(","))
    if kind == "pairs":
        return PairClassification(spec, rest.split(","))
    if kind == "sts":
        return STS(spec, rest)
    if kind == "xnli":
        return XNLI(spec, rest.split(","))
    if kind == "canonical":
        return Canonical(spec, rest)
    raise ValueError(f"suite {spec!r}: unknown kind {kind!r}; expected retrieval, bitext, pairs, sts, xnli or canonical")


def run_suites(model: Encoder, specs: Sequence[str], opts: Options) -> list[SuiteOutput]:
    check_task(opts.task)
    suites = [parse_suite(s) for s in specs]  # every spec checked before the first one runs
    return [s.run(model, opts) for s in suites]
