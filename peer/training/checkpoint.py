"""Checkpoints in ``--save-dir``: ``checkpoint-<global step>/`` folders written atomically.

Each holds the trainable weights (``save_pretrained``: the adapter, or the whole model; a prompt-learning
adapter's whole prompt encoder too, ``peer/training/model.py``), the tokenizer (so the folder loads on
its own), the averaging strategy's state (optimizer statistics and global step) and
``trainer_state.json``. A restart with the same ``--save-dir`` resumes from the
newest one whose run id matches.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from potluck.peer.training.model import save_weights

logger = logging.getLogger(__name__)
PREFIX = "checkpoint-"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    global_step: int
    run_id: str

    @property
    def strategy_state_path(self) -> Path:
        return self.path / "strategy_state.pt"


def list_checkpoints(save_dir: Path, run_id: str | None = None) -> list[Checkpoint]:
    found = []
    for folder in save_dir.glob(f"{PREFIX}*"):
        state_file = folder / "trainer_state.json"
        if not state_file.is_file():
            continue  # an interrupted write: ignore it
        try:
            state = json.loads(state_file.read_text())
            checkpoint = Checkpoint(folder, int(state["global_step"]), str(state["run_id"]))
        except (ValueError, KeyError) as e:
            logger.warning(f"ignoring unreadable checkpoint {folder}: {e!r}")
            continue
        if run_id is None or checkpoint.run_id == run_id:
            found.append(checkpoint)
    return sorted(found, key=lambda c: c.global_step)


def latest_checkpoint(save_dir: Path, run_id: str) -> Checkpoint | None:
    found = list_checkpoints(save_dir, run_id)
    return found[-1] if found else None


def save_checkpoint(
    save_dir: Path, run_id: str, global_step: int, model, tokenizer, strategy_state: dict, keep: int
) -> Checkpoint:
    save_dir.mkdir(parents=True, exist_ok=True)
    final = save_dir / f"{PREFIX}{global_step:07d}"
    staging = save_dir / f".staging-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    save_weights(model, staging)
    tokenizer.save_pretrained(staging)
    torch.save(strategy_state, staging / "strategy_state.pt")
    (staging / "trainer_state.json").write_text(
        json.dumps({"run_id": run_id, "global_step": global_step, "saved_at": time.time()})
    )
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    if keep > 0:
        for old in list_checkpoints(save_dir, run_id)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    return Checkpoint(final, global_step, run_id)
