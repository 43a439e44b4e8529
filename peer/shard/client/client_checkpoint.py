"""Checkpoints of what a shard client (``run-peer --role client``) trains itself, in ``--save-dir``, beside (never
mistaken for) a trainer's or a server's.

What the client trains: a ``prompt_tuning`` prompt or a ``prefix``, or for a mixture-of-experts model everything
but the experts (attention, embeddings, norms, routers, head); a ``lora`` client trains nothing itself (the servers
checkpoint the adapter), and its checkpoint holds its step count alone. ``client-checkpoint-<global step>/`` folders, written atomically by
``runtime/checkpoints.write_checkpoint`` and kept ``checkpoint.keep`` at a time: ``client.pt`` holds the trained
parameters by name, ``strategy_state.pt`` the averaging strategy's state (optimizer statistics, global step). A
client saves every ``checkpoint.save_every`` global steps and when it stops, and resumes from its newest checkpoint
of the run at start.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from potluck.runtime.checkpoints import Checkpoint, latest_checkpoint, write_checkpoint

PREFIX = "client-checkpoint-"
TRAINED_FILE = "client.pt"
STRATEGY_FILE = "strategy_state.pt"  # Checkpoint.strategy_state_path


class ClientCheckpointMismatch(ValueError):
    """A client checkpoint whose parameters are not the ones this client trains (another adapter or model)."""


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_client(
    save_dir: Path, run_id: str, global_step: int, model: nn.Module, strategy, keep: int
) -> Checkpoint:
    """Write the client's trained parameters (none for a ``lora`` client: its step count alone) and its strategy's
    state."""
    trained = {name: p.detach().cpu().clone() for name, p in trained_parameters(model).items()}
    strategy_state = strategy.state_dict()

    def write(folder: Path) -> None:
        torch.save(trained, folder / TRAINED_FILE)
        torch.save(strategy_state, folder / STRATEGY_FILE)

    return write_checkpoint(save_dir, run_id, global_step, write, keep, PREFIX)


def load_client_weights(save_dir: Path, run_id: str, model: nn.Module) -> Checkpoint | None:
    """Load the run's newest client checkpoint in ``save_dir`` into ``model``'s trained parameters; None if there is
    none. Call it before the averaging strategy is made: hivemind's optimizer keeps its own copy of the parameters
    from then on (``offload_optimizer``), and would step the weights from before the resume. Then give the strategy
    its state with :func:`load_strategy_state`. Raises :class:`ClientCheckpointMismatch` naming the folder when
    its parameters are not this client's (nothing is loaded then)."""
    found = latest_checkpoint(save_dir, run_id, PREFIX)
    if found is None:
        return None
    saved = torch.load(found.path / TRAINED_FILE, weights_only=True)
    own = trained_parameters(model)
    shapes = {name: tuple(t.shape) for name, t in saved.items()}
    if shapes != {name: tuple(p.shape) for name, p in own.items()}:
        missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        raise ClientCheckpointMismatch(
            f"{found.path}: its parameters are not the ones this client trains (missing {missing[:3]}, "
            f"unexpected {extra[:3]}, or other shapes): another adapter or model? Move it out of --save-dir"
        )
    with torch.no_grad():
        for name, parameter in own.items():
            parameter.copy_(saved[name].to(parameter.device, parameter.dtype))
    return found


def load_strategy_state(found: Checkpoint, strategy) -> None:
    """The averaging strategy's state (optimizer statistics, global step) from ``found``."""
    strategy.load_state_dict(torch.load(found.strategy_state_path, weights_only=False))
