"""How every command reports: JSON or text on stdout, one-line errors on stderr, exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from cnnserve.errors import CnnserveError

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "emit", "fail", "run_command", "CommandFunc"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's code for a malformed command line
EXIT_INTERRUPTED = 130

CommandFunc = Callable[[argparse.Namespace], int]


def emit(args: argparse.Namespace, result: Any, text: str | Callable[[], str]) -> None:
    """Print ``result`` as JSON with ``--json``, else the human-readable ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text() if callable(text) else text)


def fail(message: str) -> int:
    print(f"cnnserve: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def run_command(args: argparse.Namespace) -> int:
    """Run the chosen command, turning expected failures into one line on stderr."""
    # Our own loggers speak at INFO; libraries (onnxscript narrates every export pass) only at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cnnserve").setLevel(logging.INFO)
    func: CommandFunc = args.func
    try:
        return func(args)
    except CnnserveError as exc:
        return fail(exc.message)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        return fail(f"{exc.strerror}: {exc.filename}")
    except KeyboardInterrupt:
        print("cnnserve: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `cnnserve ... | head`: the reader left; that is not an error
        sys.stderr.close()
        return EXIT_OK
