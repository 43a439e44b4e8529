"""Checkpoint folders in a save directory: ``<prefix><step>/``, written atomically, found again by run id.

The one format of trainers' checkpoints (``peer/training/checkpoint.py``, prefix ``checkpoint-``) and shard
servers' span adapters (``peer/shard/server/span_checkpoint.py``, ``span-checkpoint-``): what each folder holds
is its writer's; ``trainer_state.json`` marks it complete and names its run and step. One save directory
may hold several runs, and both kinds, without either mistaking the other's for its own.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from potluck.runtime.leaving import saving

logger = logging.getLogger(__name__)
PREFIX = "checkpoint-"
"""A trainer's checkpoints."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    global_step: int
    run_id: str
    state: dict = field(default_factory=dict, compare=False)
    """Everything ``trainer_state.json`` holds (a span checkpoint adds the span it belongs to)."""

    @property
    def strategy_state_path(self) -> Path:
        return self.path / "strategy_state.pt"


def list_checkpoints(save_dir: Path, run_id: str | None = None, prefix: str = PREFIX) -> list[Checkpoint]:
    found = []
    for folder in save_dir.glob(f"{prefix}*"):
        state_file = folder / "trainer_state.json"
        if not state_file.is_file():
            continue  # an interrupted write: ignore it
        try:
            state = json.loads(state_file.read_text())
            checkpoint = Checkpoint(folder, int(state["global_step"]), str(state["run_id"]), state)
        except (ValueError, KeyError) as e:
            logger.warning(f"ignoring unreadable checkpoint {folder}: {e!r}")
            continue
        if run_id is None or checkpoint.run_id == run_id:
            found.append(checkpoint)
    return sorted(found, key=lambda c: c.global_step)


def latest_checkpoint(save_dir: Path, run_id: str, prefix: str = PREFIX) -> Checkpoint | None:
    found = list_checkpoints(save_dir, run_id, prefix)
    return found[-1] if found else None


def write_checkpoint(
    save_dir: Path,
    run_id: str,
    global_step: int,
    write: Callable[[Path], None],
    keep: int,
    prefix: str = PREFIX,
    **state,
) -> Checkpoint:
    """Write ``<prefix><global_step>/`` atomically: ``write(folder)`` fills a staging folder, then
    ``trainer_state.json`` (run id, step, time and ``state``) marks it complete and it is renamed into place;
    checkpoints of the run beyond the newest ``keep`` (0: all) are removed. A leave's deadline waits for it
    (``runtime/leaving.py``)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    final = save_dir / f"{prefix}{global_step:07d}"
    staging = save_dir / f".staging-{final.name}"
    with saving():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write(staging)
        fields = {"run_id": run_id, "global_step": global_step, "saved_at": time.time(), **state}
        (staging / "trainer_state.json").write_text(json.dumps(fields))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    if keep > 0:
        for old in list_checkpoints(save_dir, run_id, prefix)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    return Checkpoint(final, global_step, run_id, fields)
