"""What every `python -m pipelines.<name>` entrypoint does around its work."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
            argv: list[str] | None = None) -> int:
    """Parse `argv` and run; bad input (a ValueError, whose message names the field or file)
    prints `error: …` on stderr and exits 2 instead of a traceback."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
