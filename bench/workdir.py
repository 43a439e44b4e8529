"""What the swarm benchmarks share: run in ``--workdir`` (kept, for logs and ``--reuse``) or a temporary folder."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from potluck.peer.training.checkpoint import list_checkpoints
from potluck.protocols.runspec import AveragingSpec
from potluck.tools.peer_processes import wait_on


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


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.2):
    """``condition()``'s first truthy value, polled every ``every`` seconds for up to ``timeout`` seconds."""
    return wait_on(condition, timeout, f"no {what}", every=every)


def write_tiny_spec(
    path: Path,
    workdir: Path,
    run_id: str,
    target: int,
    batch: int,
    averaging: dict,
    max_global_steps: int = 100000,
    **more,
) -> Path:
    """A run spec for the tiny model and task that ``build_assets(workdir)`` built, written to ``path``:
    ``target`` samples per global step of batches of ``batch`` (by default never finishing by itself)."""
    spec = {
        "run_id": run_id,
        "model": {"name_or_path": str(workdir / "tiny-model")},
        "data": {"path": str(workdir / "data" / "train.jsonl"), "max_length": 16},
        "batch": {"target_batch_size": target, "per_peer_batch_size": batch},
        "max_global_steps": max_global_steps,
        "averaging": averaging,
        **more,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_bed_spec(workdir: Path, run_id: str, matchmaking_time: float) -> Path:
    """The spec of the benchmarks on the network test bed: the tiny model, target 256 of batches of 64,
    a checkpoint at every global step (all kept: bit-equality is judged on them), ``matchmaking_time``
    as given and ``averaging_timeout`` the smallest the run spec allows, or 20 s."""
    averaging = {"matchmaking_time": matchmaking_time, "averaging_timeout": max(20.0, 2 * matchmaking_time)}
    AveragingSpec(**averaging)  # the bench runs only settings the spec accepts
    return write_tiny_spec(
        workdir / f"{run_id}-{matchmaking_time:g}.yaml", workdir, run_id, 256, 64, averaging,
        checkpoint={"save_every": 1, "keep": 0},
    )  # fmt: skip


def step_at(events: list[dict], moment: float) -> int:
    """The newest global step in ``events`` (a peer's ``--results``) at unix time ``moment`` (-1: none yet)."""
    return max(
        (e["global_step"] for e in events if e["event"] == "global_step" and e["time"] <= moment), default=-1
    )


def common_steps(save_dirs: list[Path]) -> tuple[list[dict[int, Path]], list[int]]:
    """Each peer's checkpoints by global step, and the steps that every one of them has, in order."""
    found = [checkpoints(d) for d in save_dirs]
    return found, sorted(set.intersection(*(set(f) for f in found)))


def checkpoints(save_dir: Path) -> dict[int, Path]:
    """A peer's ``--save-dir`` checkpoints by global step."""
    return {c.global_step: c.path for c in list_checkpoints(save_dir)} if save_dir.exists() else {}


def bit_equal(paths: list[Path]) -> bool:
    """Whether the checkpoints at ``paths`` hold the same model weights, to the bit."""
    first, *others = (load_file(p / "model.safetensors") for p in paths)
    return all(all(torch.equal(first[k], other[k]) for k in first) for other in others)
