"""Every `python -m …` command in README.md, as typed there, is accepted by its module: the module
exists, its argument parser takes the flags, and the config files and `--set` keys it names load.

Parsing, not running: the end-to-end tests run each pipeline (with small sizes) in process. This
check is what catches a renamed module, flag or config key that the README still shows. Commands
wrapped in `ray job submit … -- ` are checked the same way.
"""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
HARNESS = {"tune.sweep": "sweep", "tune.ablate": "ablate"}  # configs these read as a harness


def readme_commands() -> list[list[str]]:
    """The README's `python -m` commands as argv lists (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if "python -m " not in line:
                continue
            argv = shlex.split(line[line.index("python -m "):])
            commands.append([a for a in argv[2:] if not (a.startswith("[") or a.endswith("]"))])
    return commands


class Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def parse(module: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """What `module.main(argv)` parses, stopped right after its parser accepted argv."""
    real = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_after_parsing)
    try:
        importlib.import_module(module).main(argv)
    except Parsed as done:
        return done.namespace
    raise AssertionError(f"python -m {module} returned without parsing its arguments")


COMMANDS = readme_commands()


def test_the_readme_shows_the_main_commands():
    shown = {c[0] for c in COMMANDS}
    assert {"pipelines.train", "pipelines.prepare", "pipelines.embed", "pipelines.pretokenize", "tune.sweep",
            "pipelines.serve", "pipelines.search", "pipelines.index"} <= shown, shown


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(argv, monkeypatch):
    from vipoly.config import load_config

    module, args = argv[0], argv[1:]
    ns = parse(module, args, monkeypatch)
    config = getattr(ns, "config", None)
    if config is None:
        return
    assert (REPO / config).is_file(), f"README: {' '.join(argv)}: no {config}"
    if module in HARNESS:
        from tune.config import load_harness

        load_harness(REPO / config, ns.overrides, section=HARNESS[module])
    else:
        load_config(REPO / config, ns.overrides)
