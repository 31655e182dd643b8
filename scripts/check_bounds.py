"""The lower bound of transformers in pyproject.toml is the oldest version the code runs with: this
installs exactly that version into .lowest/, in front of the project's environment, with the
newest version it accepts of each installed package whose installed version it does not accept
(tokenizers, huggingface-hub, kernels, …: what pip would pick for it), and runs the model tests
against it. tests/test_lower_bounds.py runs it (so `make test` does), and it runs alone:
`.venv/bin/python scripts/check_bounds.py`.

torch's floor is transformers' own (torch>=2.4): only the CPU build of 2.13 can be installed on the
CI machine, so older torch builds are not tried here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / ".lowest"
TESTS = ["tests/test_model.py", "tests/test_packing.py", "tests/test_gradcache.py"]
TOOLING = {"all", "dev", "testing", "quality", "docs", "benchmark", "serving", "chat_template", "ja", "deepspeed-testing"}


def floor(name: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(rf"{name}\b", d))
    return re.search(r">=\s*([\w.]+)", spec).group(1)


def refused(meta: str) -> list[str]:
    """The requirements that a transformers' METADATA sets on packages this environment holds at a
    version it does not accept: its dependencies, and the extras it imports when they are installed
    (kernels, accelerate, …), not its own tooling (dev, testing, quality, docs). A package that is
    not installed is skipped: transformers runs without it."""
    pins: dict[str, str] = {}
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        extra = re.search(r'extra == "([^"]+)"', str(req.marker or ""))
        if extra and (extra.group(1) in TOOLING or extra.group(1).startswith(("dev", "test"))):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            pins.setdefault(req.name, f"{req.name}{req.specifier}")
    return sorted(pins.values())


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TARGET), *args],
                   check=True)


def main() -> int:
    version = floor("transformers")
    shutil.rmtree(TARGET, ignore_errors=True)
    pip(f"transformers=={version}")
    meta = next(TARGET.glob("transformers-*.dist-info")) / "METADATA"
    pins = refused(meta.read_text())
    if pins:
        pip(*pins)
    print(f"lowest bound: transformers=={version} with {', '.join(pins)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TARGET), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                          cwd=REPO, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
