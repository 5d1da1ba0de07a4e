"""From result rows to what people read: the target ratios, ``results.json``, ``README.md`` and the plots.

- :mod:`~cnnserve.bench.report.targets`: each target computed from rows of one run, and the figures that
  explain a miss;
- :mod:`~cnnserve.bench.report.readme`: the README's tables and text;
- :mod:`~cnnserve.bench.report.plots`: the PNGs;
- :mod:`~cnnserve.bench.report.setup`: what a run was set up with, recorded in ``results.json``.

``python -m cnnserve.bench.report DIR`` re-renders ``DIR/README.md`` and the plots from ``DIR/results.json``
without running anything (:func:`render`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cnnserve.bench.report.plots import write_plots
from cnnserve.bench.report.readme import PLOTS, write_readme
from cnnserve.bench.report.setup import describe_setup
from cnnserve.bench.report.targets import TargetResult, evaluate_targets, find
from cnnserve.bench.results import Row
from cnnserve.errors import FailedPreconditionError

__all__ = [
    "PLOTS",
    "RESULTS_FILE",
    "TargetResult",
    "describe_setup",
    "evaluate_targets",
    "find",
    "load_results",
    "render",
    "write_plots",
    "write_readme",
    "write_results",
]

RESULTS_FILE = "results.json"


def write_results(
    out: Path, rows: Sequence[Row], targets: Sequence[TargetResult], meta: dict[str, Any]
) -> Path:
    """``results.json``: ``{"machine", "settings", "setup", ..., "targets": [...], "rows": [...]}``."""
    path = out / RESULTS_FILE
    data = {
        **meta,
        "targets": [asdict(t) | {"verdict": t.verdict} for t in targets],
        "rows": [row.to_dict() for row in rows],
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_results(path: Path) -> tuple[list[Row], dict[str, Any]]:
    """The rows and the run's metadata (everything but ``targets`` and ``rows``) of a ``results.json``."""
    data = json.loads(path.read_text())
    rows = [Row.from_dict(row) for row in data["rows"]]
    meta = {key: value for key, value in data.items() if key not in ("targets", "rows")}
    return rows, meta


def render(results: Path, out: Path | None = None) -> list[Path]:
    """README.md and the plots from ``results`` into ``out`` (default: beside it); the targets are
    evaluated again from its rows. ``results.json`` itself is left as the run wrote it.

    Raises :class:`~cnnserve.errors.FailedPreconditionError` when ``results`` does not exist.
    """
    if not results.is_file():
        raise FailedPreconditionError(f"no {results}: run `cnnserve bench --out {results.parent}` first")
    out = out or results.parent
    rows, meta = load_results(results)
    targets = evaluate_targets(rows, cores=meta["machine"].get("cores"), skipped=meta.get("skipped"))
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(out, rows)
    return [write_readme(out, rows, targets, meta, plots), *(out / name for name in plots)]
