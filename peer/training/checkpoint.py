"""Checkpoints in ``--save-dir``: ``checkpoint-<global step>/`` folders written atomically.

Each holds the trainable weights (``save_pretrained``: the adapter, or the whole model; a prompt-learning
adapter's whole prompt encoder too, ``peer/training/model.py``), the tokenizer (so the folder loads on
its own), the averaging strategy's state (optimizer statistics and global step) and
``trainer_state.json``. A restart with the same ``--save-dir`` resumes from the
newest one whose run id matches.

The folders are written and found by ``runtime/checkpoints.py``, which a shard server's span adapter
checkpoints share (``span-checkpoint-<span step>/``): a trainer never mistakes one for its own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from potluck.peer.training.model import save_weights
from potluck.runtime.checkpoints import Checkpoint, latest_checkpoint, list_checkpoints, write_checkpoint

__all__ = ["Checkpoint", "latest_checkpoint", "list_checkpoints", "save_checkpoint"]


def save_checkpoint(
    save_dir: Path, run_id: str, global_step: int, model, tokenizer, strategy_state: dict, keep: int
) -> Checkpoint:
    def write(folder: Path) -> None:
        save_weights(model, folder)
        tokenizer.save_pretrained(folder)
        torch.save(strategy_state, folder / "strategy_state.pt")

    return write_checkpoint(save_dir, run_id, global_step, write, keep)
