"""The contract between the shared training loop and a stage."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Stage(ABC):
    """A stage computes the loss of one local batch. It owns no optimizer and no network code:
    the trainer does backward and hands the gradients to the averaging strategy."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss of the batch (a scalar with a graph to the trainable parameters)."""

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        """Samples in the batch, as counted toward ``target_batch_size``."""
        return int(batch["input_ids"].shape[0])
