"""The contract between the shared training loop and a stage, and what a stage may know about its run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from potluck.protocols.runspec import ModelSpec, RunSpec


@dataclass(frozen=True)
class StageContext:
    """What a stage needs beyond ``(model, batch)``: the run spec, the policy's tokenizer, the device, and where
    this peer keeps checkpoints (to resolve ``init_from``, reference, teacher and reward-model run ids)."""

    spec: RunSpec
    tokenizer: Any
    device: torch.device
    start_model: ModelSpec
    """``spec.model`` with ``init_from`` resolved: the weights this run starts from."""
    save_dir: Path | None = None


class Stage(ABC):
    """A stage computes the loss of one local batch. It owns no optimizer and no network code:
    the trainer does backward and hands the gradients to the averaging strategy.

    Frozen models a stage needs (a reference, a teacher, a reward model) are loaded when it is made, from
    ``context``; they never cross the network and are not averaged."""

    def __init__(self, context: StageContext | None = None):
        self.context = context
        self.last_metrics: dict[str, float] = {}
        """Per-stage figures of the latest local batch (reward, KL, accuracy...), exported by ``PeerMetrics``."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Mean loss of the batch (a scalar with a graph to the trainable parameters)."""

    def batch_size(self, batch: dict[str, Any]) -> int:
        """Samples in the batch, as counted toward ``target_batch_size``."""
        return int(batch["input_ids"].shape[0])

    def build_model(self, weights_from: str | None = None) -> torch.nn.Module:
        """The module the swarm trains: the run's causal LM (with its adapter) starting from ``start_model``;
        ``weights_from`` (this run's own checkpoint) restores trained weights on resume."""
        from potluck.peer.training.model import build_model

        context = self._require_context()
        spec = context.spec.model_copy(update={"model": context.start_model})
        return build_model(spec, context.device, weights_from=weights_from)

    def _require_context(self) -> StageContext:
        if self.context is None:
            raise RuntimeError(f"{type(self).__name__} needs a StageContext (make_stage(name, context))")
        return self.context
