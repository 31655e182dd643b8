"""What a fresh Ray process pays before its first piece of work, in CPU-seconds (imports included).

    python bench/process_imports.py [--repeat 3]

Every training run starts fresh processes: Ray Train's controller, one per worker, and the Ray
tasks that tokenise and decode images. Each role is measured in a new interpreter (the fastest of
`--repeat`), as what it runs now against what it ran before:
  controller    unpickling the run's entry point and stream factory: `vipoly.train.launch` (now)
                against `vipoly.train.loop` + `vipoly.train.batches` (where they lived before)
  decode task   the first `tokenize_rows` of rows with an image (the processor, no model code) against
                the same after importing the model code, which `vipoly.model`'s eager `__init__`
                imported with it before
Prints each pair and the ratio.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SETUP = "import sys, time; sys.path.insert(0, {repo!r}); t = time.process_time()\n"
DONE = "\nprint(time.process_time() - t)"
DECODE = """
import pyarrow.parquet as pq
from vipoly.data.tokenize import tokenize_rows
table = pq.read_table(sorted(__import__('glob').glob({data!r} + '/ocr/*.parquet'))[0]).slice(0, 2)
encoded, bad = tokenize_rows(table, {model!r})
assert encoded is not None and not bad
"""
ROLES = {
    "controller": ("import vipoly.train.launch", "import vipoly.train.loop, vipoly.train.batches"),
    "decode task": (DECODE, "import vipoly.model.embedder" + DECODE),
}


def cpu_seconds(code: str, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", SETUP.format(repo=str(REPO)) + code + DONE], cwd=REPO,
                             capture_output=True, text=True, check=True)
        runs.append(float(out.stdout.strip().splitlines()[-1]))
    return min(runs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from vipoly.data.synthetic import write_synthetic
    from vipoly.model.tiny import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="vipoly-bench-imports-"))
    write_synthetic(tmp / "data", n=20, seed=0)
    model = build_tiny(tmp / "tiny", seed=0)
    for role, (now, before) in ROLES.items():
        fill = {"data": str(tmp / "data"), "model": str(model)}
        a, b = cpu_seconds(now.format(**fill), args.repeat), cpu_seconds(before.format(**fill), args.repeat)
        print(f"{role:<12} now {a:5.2f} CPU-s   before {b:5.2f} CPU-s   now/before {a / b:.2f}")


if __name__ == "__main__":
    main()
