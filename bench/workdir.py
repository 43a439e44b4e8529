"""What the swarm benchmarks share: run in ``--workdir`` (kept, for logs and ``--reuse``) or a temporary folder."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path


def run_in_workdir(
    run: Callable[[Path, argparse.Namespace], int], args: argparse.Namespace, name: str
) -> int:
    """``run(folder, args)`` in ``args.workdir`` if given, else in a temporary folder removed afterwards;
    without transformers' progress bars, which would bury the benchmark's own lines."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args.workdir.resolve(), args)
    with tempfile.TemporaryDirectory(prefix=f"potluck-bench-{name}-") as tmp:
        return run(Path(tmp), args)


def runs_parser(doc: str | None, runs: int = 3) -> argparse.ArgumentParser:
    """A benchmark's parser (its docstring's first paragraph as description) with ``--runs`` and
    ``--workdir``, for :func:`run_in_workdir`."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=runs, help="repetitions (min / median / max are printed)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep assets and logs here (default: a temporary folder)"
    )
    return parser


def median_min_max(name: str, values: list[float], digits: int = 3) -> str:
    """``name=MEDIAN min=MIN max=MAX``: the start of a benchmark's last line."""
    return f"{name}={statistics.median(values):.{digits}f} min={min(values):.{digits}f} max={max(values):.{digits}f}"
