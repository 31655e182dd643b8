"""The base of every config section: unknown keys and bad values fail, naming the field.

Each component's section sits beside it (`vipoly/model/config.py`, `vipoly/losses/config.py`,
`vipoly/stw/config.py`, `vipoly/data/config.py`, `vipoly/train/config.py`) and imports only this
module and `vipoly.tasks`; `vipoly.config` assembles them into one tree and loads YAML and `--set`.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from vipoly.tasks import TASKS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False,
                              use_attribute_docstrings=True)  # a field's docstring is its description


def per_task(values: dict[str, float], what: str) -> dict[str, float]:
    """`values` if every key is a task name; a ValueError naming `what` and the strangers otherwise."""
    unknown = set(values) - set(TASKS)
    if unknown:
        raise ValueError(f"{what}: unknown task(s) {sorted(unknown)}; expected {list(TASKS)}")
    return values


def all_tasks(values: dict[str, float], what: str) -> dict[str, float]:
    """`per_task`, and every task present."""
    per_task(values, what)
    missing = set(TASKS) - set(values)
    if missing:
        raise ValueError(f"{what}: missing task(s) {sorted(missing)}")
    return values
