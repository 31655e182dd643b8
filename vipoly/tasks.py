"""The five task types: names, prefixes and loss recipes.

`TASKS` fixes the order of every per-task vector in the project (λ, stats, metrics). Numbers (α,
static weights, margins) live in `vipoly.config`, not here: this module says *what* a task is, the
config says *how much*.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("text_pair", "instr", "ocr", "vqa_single", "vqa_multi")
TASK_INDEX: dict[str, int] = {t: i for i, t in enumerate(TASKS)}
LANGS: tuple[str, ...] = ("vi", "en", "zh", "other")


class Recipe(str, enum.Enum):
    """Which loss terms join InfoNCE for a task (SPEC §2)."""

    SCORE_RANK = "nce+score+rank"  # text_pair: graded similarity
    COSINE = "nce+cosine"  # instr: pull the pair together directly
    TRIPLET = "nce+triplet"  # ocr / vqa: margin against in-batch negatives


@dataclass(frozen=True)
class Task:
    name: str
    prefix: str
    recipe: Recipe


TASK_SPECS: dict[str, Task] = {
    "text_pair": Task("text_pair", "<text_pair>", Recipe.SCORE_RANK),
    "instr": Task("instr", "<instr>", Recipe.COSINE),
    "ocr": Task("ocr", "<ocr>", Recipe.TRIPLET),
    "vqa_single": Task("vqa_single", "<vqa_single>", Recipe.TRIPLET),
    "vqa_multi": Task("vqa_multi", "<vqa_multi>", Recipe.TRIPLET),
}


def check_task(name: str | None) -> str | None:
    """Return `name` if it is a known task (or None); raise a ValueError naming it otherwise."""
    if name is None or name in TASK_INDEX:
        return name
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


def task_id(name: str) -> int:
    check_task(name)
    return TASK_INDEX[name]


def prefix(name: str | None) -> str:
    """The text marker that conditions the shared model on a task ('' for no task)."""
    return "" if check_task(name) is None else TASK_SPECS[name].prefix + " "
