"""A saved PolyEmbedder as a sentence-transformers model: the two files that say so.

    modules.json                        one module, `vipoly.st.module.PolyModule`, saved in the root
    config_sentence_transformers.json   prompts (one per task: "<instr> ", …), default_prompt_name,
                                        similarity_fn_name "cosine"

`PolyEmbedder.save_pretrained` writes both, so `SentenceTransformer(model_dir, trust_remote_code=True)`
loads any saved folder where vipoly is installed; `python -m vipoly.st add DIR` adds them to folders
saved before. `vipoly.st.load(model_dir)` gives the same SentenceTransformer without the flag.

Design choices:
- The folder holds no code. modules.json names a class of the installed vipoly package, never a file
  of the folder: its dotted path has more than two parts, which transformers' dynamic-module loader
  refuses, so sentence-transformers imports it from site-packages. sentence-transformers ≥ 6 asks for
  `trust_remote_code=True` before it imports any class outside its own package, installed or not
  (its PR #3935); that flag then permits exactly `import vipoly.st.module`.
- Task prefixes are ST prompts named after the tasks. The module maps a prompt that is a task prefix
  back to its task, so `encode(x, prompt_name="instr")` tokenises exactly as
  `PolyEmbedder.encode(x, task="instr")` (a prefix glued to the text would tokenise differently).
  With a default task, `query` and `document` prompts name it too: MTEB and `encode_query` /
  `encode_document` look for those, and vipoly gives both sides of a pair the same prefix.
- `default_prompt_name` comes from the training config (`default_task`): the task with the largest
  `data.mix` weight. A folder saved outside a training run has none: no prefix, as `encode` does.

This module imports neither torch nor sentence-transformers; `vipoly.st.module` needs both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from vipoly.tasks import TASKS, prefix

MODULE_TYPE = "vipoly.st.module.PolyModule"
MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
RETRIEVAL_PROMPTS = ("query", "document")


def prompts(default: str | None = None) -> dict[str, str]:
    """{prompt name: prompt}: one per task; with `default`, also `query` and `document` → its prefix."""
    out = {t: prefix(t) for t in TASKS}
    if default is not None:
        out.update({name: prefix(default) for name in RETRIEVAL_PROMPTS})
    return out


def default_task(config: Mapping[str, Any]) -> str | None:
    """The task a training config weighs most in `data.mix` (ties: the earlier task of TASKS), or
    None when the mix names sources rather than tasks. `config` is a Config or its dict."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    mix = {k: float(w) for k, w in ((config.get("data") or {}).get("mix") or {}).items() if float(w) > 0}
    if not mix or any(k not in TASKS for k in mix):
        return None
    return max(mix, key=lambda t: (mix[t], -TASKS.index(t)))


def st_config(default_prompt_name: str | None = None) -> dict[str, Any]:
    """The content of config_sentence_transformers.json."""
    if default_prompt_name is not None and default_prompt_name not in TASKS:
        raise ValueError(f"default prompt name {default_prompt_name!r} is not a task; expected one of {', '.join(TASKS)}")
    return {"model_type": "SentenceTransformer", "__version__": {"vipoly": vipoly_version()},
            "prompts": prompts(default_prompt_name), "default_prompt_name": default_prompt_name,
            "similarity_fn_name": "cosine"}


def write_st_files(model_dir: str | Path, default_prompt_name: str | None = None) -> list[Path]:
    """Write modules.json and config_sentence_transformers.json into a saved PolyEmbedder folder."""
    out = Path(model_dir)
    modules = [{"idx": 0, "name": "0", "path": "", "type": MODULE_TYPE}]
    files = {MODULES_FILE: modules, ST_CONFIG_FILE: st_config(default_prompt_name)}
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return [out / name for name in files]


def read_st_config(model_dir: str | Path) -> dict[str, Any]:
    """config_sentence_transformers.json of a folder, checked: ValueError naming the file and key."""
    path = Path(model_dir) / ST_CONFIG_FILE
    modules_path = Path(model_dir) / MODULES_FILE
    for p in (modules_path, path):
        if not p.is_file():
            raise ValueError(f"{p} is missing: add the sentence-transformers files with "
                             f"`python -m vipoly.st add {model_dir}`")
    modules = _read_json(modules_path)
    if not (isinstance(modules, list) and len(modules) == 1 and isinstance(modules[0], dict)
            and modules[0].get("type") == MODULE_TYPE and modules[0].get("path", "") == ""):
        raise ValueError(f"{modules_path}: expected one module of type {MODULE_TYPE!r} saved in the root, got {modules!r}")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    got = config.get("prompts")
    if not isinstance(got, dict) or any(not isinstance(v, str) for v in got.values()):
        raise ValueError(f"{path}: key 'prompts' must map prompt names to strings, got {got!r}")
    missing = [t for t in TASKS if t not in got]
    if missing:
        raise ValueError(f"{path}: key 'prompts' lacks the task prompt(s) {missing}")
    default = config.get("default_prompt_name")
    if default is not None and default not in got:
        raise ValueError(f"{path}: key 'default_prompt_name' is {default!r}, which is not among the prompts {sorted(got)}")
    return config


def vipoly_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vipoly")
    except PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "unknown"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def load(model_dir: str | Path, **kwargs: Any):
    """`SentenceTransformer` over a saved folder without `trust_remote_code`: the module is built
    here and handed over, with the folder's prompts, default prompt and similarity. `kwargs` go to
    `SentenceTransformer` (device, truncate_dim, …)."""
    from sentence_transformers import SentenceTransformer

    from vipoly.st.module import PolyModule

    config = read_st_config(model_dir)
    kwargs.setdefault("prompts", config["prompts"])
    kwargs.setdefault("default_prompt_name", config.get("default_prompt_name"))
    kwargs.setdefault("similarity_fn_name", config.get("similarity_fn_name", "cosine"))
    return SentenceTransformer(modules=[PolyModule.load(str(model_dir))], **kwargs)


__all__ = ["MODULE_TYPE", "MODULES_FILE", "ST_CONFIG_FILE", "prompts", "default_task", "st_config",
           "write_st_files", "read_st_config", "load"]
