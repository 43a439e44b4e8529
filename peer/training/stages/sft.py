"""Supervised fine-tuning: next-token cross-entropy on the completion tokens."""

from __future__ import annotations

import torch

from potluck.peer.training.stages.base import Stage


class SupervisedFineTuning(Stage):
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # labels are -100 on prompt and padding tokens; the model shifts them internally
        return model(**batch).loss
