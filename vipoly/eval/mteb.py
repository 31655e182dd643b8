"""Our model in MTEB's own harness: MTEB tasks (hub, or local SQuAD files) through `mteb.evaluate`.

MTEB takes the model as a SentenceTransformer (`vipoly.st.load`, no `trust_remote_code` needed),
wraps it in its `SentenceTransformerEncoderWrapper` and runs its own retrieval evaluator (its
search, its pytrec_eval scoring). `squad_task` builds a retrieval task from a SQuAD-format file
with no hub access: the questions `pipelines.evaluate --suite retrieval:squad:PATH` uses (the same
seeded `--limit` sample), every paragraph of the file as the corpus, each question's own paragraph
relevant (score 1). So both harnesses score the same queries, corpus, relevance and cutoff.

`prompt`: the task prefix put on both queries and documents (vipoly trains both sides of a pair
with the task's prefix), as `pipelines.evaluate --task`. None: the folder's `query` / `document`
prompts where it has a default task, else no prefix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from vipoly.folder import read_meta
from vipoly.tasks import check_task, prefix

LANG_SCRIPT = {"vi": "vie-Latn", "en": "eng-Latn", "zh": "zho-Hans"}


def squad_task(path: str | Path, limit: int | None = None, seed: int = 0, lang: str | None = None):
    """An MTEB retrieval task (split `test`, main score nDCG@10) over a SQuAD-format file; the
    queries are the ones `pipelines.evaluate`'s retrieval suite picks for the same limit and seed."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    from vipoly.eval import data as D
    from vipoly.eval.suites import sample

    stem = Path(path).name.removesuffix(".json")
    lang = lang or stem.rsplit(".", 1)[-1]
    if lang not in LANG_SCRIPT:
        raise ValueError(f"{path}: cannot tell the language from the file name (xquad.vi.json: vi); "
                         f"pass lang= one of {sorted(LANG_SCRIPT)}")
    squad = D.load_squad(path)
    sel = sample(len(squad.questions), limit, seed)
    queries = Dataset.from_dict({"id": [f"q{i}" for i in sel], "text": [squad.questions[i] for i in sel]})
    corpus = Dataset.from_dict({"id": [f"d{j}" for j in range(len(squad.paragraphs))], "text": squad.paragraphs})
    relevant = {f"q{i}": {f"d{int(squad.paragraph_of[i])}": 1} for i in sel}
    split = RetrievalSplitData(queries=queries, corpus=corpus, relevant_docs=relevant, top_ranked=None)

    class SquadRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=f"vipoly-squad-{stem}", type="Retrieval", category="t2t", modalities=["text"],
            description=f"Question → paragraph retrieval over {Path(path).name} ({len(sel)} questions, "
                        f"{len(squad.paragraphs)} paragraphs), built locally by vipoly.eval.mteb.",
            reference=None, dataset={"path": str(Path(path).resolve()), "revision": "local"},
            eval_splits=["test"], eval_langs=[LANG_SCRIPT[lang]], main_score="ndcg_at_10",
            date=None, domains=["Encyclopaedic"], task_subtypes=["Question answering"], license="cc-by-sa-4.0",
            annotations_creators="human-annotated", dialect=[], sample_creation="found", bibtex_citation="")

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return SquadRetrieval()


def encoder(model_dir: str | Path, prompt: str | None = None, device: str | None = None):
    """The model as MTEB's SentenceTransformer wrapper, with `prompt` (a task) on both sides."""
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    from vipoly.st import load

    check_task(prompt)
    model = load(model_dir, device=device)
    # MTEB names results after the model ("org/name"); the folder's own name, under vipoly/
    meta = read_meta(model_dir)
    model.model_card_data.model_name = f"vipoly/{meta.get('name') or Path(model_dir).name}"
    # MTEB looks up `query` / `document` (or its own task names) and warns about any other key: the
    # model it gets holds just those two, from `prompt` or else the folder's own.
    sides = ("query", "document")
    model.prompts = ({side: prefix(prompt) for side in sides} if prompt else
                     {side: model.prompts[side] for side in sides if model.prompts.get(side)})
    return SentenceTransformerEncoderWrapper(model)


def evaluate(model_dir: str | Path, tasks: Sequence, prompt: str | None = None, batch_size: int = 32,
             device: str | None = None, cache_dir: str | Path | None = None, progress: bool = False) -> dict[str, dict]:
    """Run `tasks` with `mteb.evaluate` → {task name: {split: main scores of the first subset…}};
    with `cache_dir` MTEB also keeps its result files there (else nothing is written)."""
    import mteb

    wrapped = encoder(model_dir, prompt, device)
    cache = mteb.ResultCache(cache_path=str(cache_dir)) if cache_dir is not None else None
    result = mteb.evaluate(wrapped, tasks, cache=cache, encode_kwargs={"batch_size": batch_size},
                           show_progress_bar=progress, overwrite_strategy="always")
    return {r.task_name: r.scores for r in result.task_results}
