"""The lower bound of transformers in pyproject.toml is the oldest version the code runs with: this
installs exactly that version (and the tokenizers and huggingface-hub it accepts) into .lowest/,
in front of the project's environment, and runs the model tests against it. `make test` runs it.

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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / ".lowest"
TESTS = ["tests/test_model.py", "tests/test_packing.py", "tests/test_gradcache.py"]


def floor(name: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(rf"{name}\b", d))
    return re.search(r">=\s*([\w.]+)", spec).group(1)


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TARGET), *args],
                   check=True)


def main() -> int:
    version = floor("transformers")
    shutil.rmtree(TARGET, ignore_errors=True)
    pip(f"transformers=={version}")
    meta = next(TARGET.glob("transformers-*.dist-info")) / "METADATA"
    # What that transformers accepts of its two fast-moving dependencies (the newest of each in range).
    pins = [line.split(":", 1)[1].strip() for line in meta.read_text().splitlines()
            if re.match(r"Requires-Dist: (huggingface-hub|tokenizers)\b", line) and "extra ==" not in line]
    pip(*pins)
    print(f"lowest bound: transformers=={version} with {', '.join(pins)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TARGET), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                          cwd=REPO, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
