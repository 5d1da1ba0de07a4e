"""``python -m cnnserve.bench.report [DIR] [--out OUT]``: re-render a benchmark's README.md and plots.

Reads ``DIR/results.json`` (default ``docs/bench``) and writes ``README.md`` and the PNGs into ``--out``
(default: ``DIR``); runs nothing and leaves ``results.json`` as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnnserve.bench.report import RESULTS_FILE, render
from cnnserve.errors import FailedPreconditionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnserve.bench.report", description=__doc__)
    parser.add_argument("dir", nargs="?", default="docs/bench", help="directory holding results.json")
    parser.add_argument("--out", help="where README.md and the plots go (default: DIR)")
    args = parser.parse_args(argv)
    try:
        files = render(Path(args.dir) / RESULTS_FILE, Path(args.out) if args.out else None)
    except FailedPreconditionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
