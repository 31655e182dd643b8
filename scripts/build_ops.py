"""Build, once per virtual environment, the DeepSpeed op that its CPU runs load: the shared-memory
communication op (`ShareMemCommBuilder`), which `deepspeed.comm` compiles on first use with the
C++ compiler (≈ 50 CPU-seconds on 2 cores). `make setup` runs this with TORCH_EXTENSIONS_DIR set to
.venv/torch_extensions, and the tests hand the same folder to Ray's workers, so no ZeRO test run
compiles it again. Outside the tests DeepSpeed builds it where TORCH_EXTENSIONS_DIR points (by
default ~/.cache/torch_extensions), once per machine; GPU runs never build it."""
from __future__ import annotations

import os
import sys


def main() -> int:
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        print("TORCH_EXTENSIONS_DIR is not set: nothing to build into", file=sys.stderr)
        return 2
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        print("DeepSpeed's shared-memory op does not apply to this accelerator: nothing built")
        return 0
    builder.load(verbose=False)
    print(f"built {builder.absolute_name()} in {os.environ['TORCH_EXTENSIONS_DIR']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
