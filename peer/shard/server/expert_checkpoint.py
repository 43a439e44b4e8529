"""Checkpoints of an expert server's experts in ``--save-dir``, beside (never mistaken for) a trainer's or a span
server's.

``expert-checkpoint-<steps>/`` folders (``<steps>``: the optimizer steps of all its experts together), written
atomically by ``runtime/checkpoints.write_checkpoint`` and kept ``checkpoint.keep`` at a time: ``experts.pt``
holds each expert's weights, AdamW state and step count, ``trainer_state.json`` the run id and the uids. A server
saves every ``checkpoint.save_every`` steps and when it leaves cleanly, and resumes the experts it serves from its
newest checkpoint of the run at start (experts the checkpoint lacks start from the model's weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from potluck.peer.shard.server.expert_service import ServedExperts
from potluck.protocols.experts import expert_uid
from potluck.runtime.checkpoints import Checkpoint, latest_checkpoint, write_checkpoint

PREFIX = "expert-checkpoint-"
EXPERTS_FILE = "experts.pt"


def save_experts(save_dir: Path, run_id: str, served: ServedExperts, keep: int) -> Checkpoint:
    """Write every served expert's state (each read under its own lock)."""
    state = {}
    for uid, expert in served.experts.items():
        steps = served.steps[uid]
        with steps.lock:
            state[expert_uid(*uid)] = {
                "weights": {k: v.detach().clone() for k, v in expert.state_dict().items()},
                "optimizer": steps.optimizer.state_dict(),
                "steps": steps.steps,
            }

    def write(folder: Path) -> None:
        torch.save(state, folder / EXPERTS_FILE)

    return write_checkpoint(save_dir, run_id, served.total_steps, write, keep, PREFIX, uids=sorted(state))


def resume_experts(save_dir: Path, run_id: str, served: ServedExperts) -> Checkpoint | None:
    """Load the served experts' states from the run's newest expert checkpoint in ``save_dir``; None if none."""
    found = latest_checkpoint(save_dir, run_id, PREFIX)
    if found is None:
        return None
    saved = torch.load(found.path / EXPERTS_FILE, weights_only=True)
    for uid, expert in served.experts.items():
        state = saved.get(expert_uid(*uid))
        if state is None:
            continue
        steps = served.steps[uid]
        with steps.lock:
            expert.load_state_dict(state["weights"])
            steps.optimizer.load_state_dict(state["optimizer"])
            steps.steps = steps.schedule.last_epoch = state["steps"]
    return found
