"""pyproject.toml's lower bound of transformers is true: scripts/check_bounds.py installs exactly that
version into .lowest/ and runs the model tests against it (a pytest process of its own).

It runs inside the suite rather than before it: alone it kept about one of the two cores busy for
its pip install and single pytest process; here the other xdist worker fills the second core."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_model_tests_pass_on_the_lowest_transformers():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "check_bounds.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (f"the model tests failed on the lowest bound:\n{done.stdout[-6000:]}\n"
                                  f"{done.stderr[-3000:]}")
