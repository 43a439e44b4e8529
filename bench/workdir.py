"""What the swarm benchmarks share: run in ``--workdir`` (kept, for logs and ``--reuse``) or a temporary folder."""

from __future__ import annotations

import argparse
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
