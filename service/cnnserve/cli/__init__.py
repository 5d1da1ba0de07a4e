"""``cnnserve``: one console script, one sub-command per task.

Every command has ``--help``; user errors print one line (``cnnserve: error: ...``) and exit non-zero, never
a traceback; commands that print results take ``--json``. Heavy imports (torch, grpc) happen inside the
commands, so ``cnnserve --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cnnserve.cli import bench, offline, remote, serving
from cnnserve.cli._output import run_command

__all__ = ["main", "build_parser"]

# Each module adds its sub-commands; later ones (serving, client, bench) register here the same way.
_COMMAND_MODULES = (offline, serving, remote, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnserve",
        description="Train, export, serve and call convolutional image classifiers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
