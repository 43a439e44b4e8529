"""Training stages: each turns a batch into a loss. The trainer's loop is shared by all of them.

``make_stage(name, context)``; a stage also says how its data is read (``peer/training/stages/data.py``), builds the module
the swarm trains (``Stage.build_model``) and records per-stage metrics (``Stage.last_metrics``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from potluck.peer.training.stages.base import Stage, StageContext
from potluck.peer.training.stages.distill import Distillation
from potluck.peer.training.stages.preference import DirectPreferenceOptimization, RewardModeling
from potluck.peer.training.stages.rl import GroupRelativePolicyOptimization, ProximalPolicyOptimization
from potluck.peer.training.stages.sft import SupervisedFineTuning
from potluck.protocols.runspec import RunSpec

STAGES: dict[str, type[Stage]] = {
    "sft": SupervisedFineTuning,
    "rm": RewardModeling,
    "dpo": DirectPreferenceOptimization,
    "grpo": GroupRelativePolicyOptimization,
    "ppo": ProximalPolicyOptimization,
    "distill": Distillation,
}


def make_stage(name: str, context: StageContext | None = None, **models) -> Stage:
    """The stage ``name``; every stage but ``sft`` needs ``context`` (it loads frozen models from it, unless
    ``models`` gives them: ``reference=`` for ``dpo``)."""
    if context is None:
        return STAGES[name]()
    return STAGES[name](context, **models)


def stage_context(spec: RunSpec, device: torch.device, save_dir: Path | None) -> StageContext:
    """Resolve ``init_from`` (a run id in ``save_dir`` or a folder) and load the tokenizer the run trains with."""
    from potluck.peer.training.model import load_tokenizer
    from potluck.peer.training.stages.models import resolve_weights

    start = spec.model
    if spec.init_from is not None:
        start = spec.model.model_copy(
            update={"name_or_path": resolve_weights(spec.init_from, save_dir, "init_from"), "revision": None}
        )
    return StageContext(spec, load_tokenizer(start), device, start, save_dir)


__all__ = ["STAGES", "Stage", "StageContext", "make_stage", "stage_context"]
