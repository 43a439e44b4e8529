"""The stages that learn from preference pairs: a reward model (``rm``, Bradley–Terry) and ``dpo``.

Both read batches from ``peer/training/stages/data.py``'s preference collation: rows ``0..B-1`` hold the chosen sequences,
rows ``B..2B-1`` the rejected ones of the same pairs; a pair counts as one sample toward ``target_batch_size``.
"""

from __future__ import annotations

from typing import Any

import torch

from potluck.peer.training.stages.base import Stage, StageContext
from potluck.peer.training.stages.losses import dpo_loss, pairwise_accuracy, pairwise_reward_loss
from potluck.peer.training.stages.models import (
    labelled_logprobs,
    load_frozen_causal_lm,
    load_reward_model,
    resolve_weights,
)


class PairwiseStage(Stage):
    def batch_size(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].shape[0]) // 2


class RewardModeling(PairwiseStage):
    """A scalar reward per sequence, trained so that chosen beats rejected (``-logsigmoid(r_c - r_r)``).

    The model is an ``AutoModelForSequenceClassification`` with one label: the starting causal LM (usually the SFT
    run, through ``init_from``) with a new score head, or any sequence-classification checkpoint, of any
    architecture and tokenizer: a decoder, scored at its last token, or an encoder such as BERT (no EOS), scored at
    its pooled ``[CLS]`` (``stages/data.py``'s ``reward_model_example``). Metric: ``pairwise_accuracy``; if it stays
    near 0.5, train longer or lower the lr; if rewards grow without bound, set ``rm.center_rewards_coefficient``."""

    def build_model(self, weights_from: str | None = None) -> torch.nn.Module:
        context = self._require_context()
        # a resumed run continues from its own checkpoint; a new one puts a fresh head, seeded, on the start model
        model = load_reward_model(
            weights_from or context.start_model.name_or_path, context.device, context.spec.seed
        )
        model.train()
        return model

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        chosen, rejected = rewards.float().chunk(2)
        center = self.context.spec.rm.center_rewards_coefficient if self.context else None
        loss = pairwise_reward_loss(chosen, rejected, center_rewards_coefficient=center)
        detached = rewards.detach()
        self.last_metrics = {
            "pairwise_accuracy": float(pairwise_accuracy(chosen.detach(), rejected.detach())),
            "reward_mean": float(detached.mean()),
            "reward_std": float(detached.std()) if detached.numel() > 1 else 0.0,
        }
        return loss


class DirectPreferenceOptimization(PairwiseStage):
    """DPO against a frozen reference (``reference.path``, default the starting weights), with ``spec.dpo``'s
    beta, loss type and label smoothing. Metrics: ``preference_accuracy`` (implicit reward of chosen above
    rejected) and ``kl`` (mean policy-minus-reference log-ratio per completion token)."""

    def __init__(self, context: StageContext, reference: torch.nn.Module | None = None):
        """``reference``: a frozen model to use instead of loading one (a shard client's: the servers' base
        blocks without its adapter)."""
        super().__init__(context)
        if reference is None:
            path = resolve_weights(context.spec.reference.path or context.start_model.name_or_path,
                                   context.save_dir, "reference.path")  # fmt: skip
            reference = load_frozen_causal_lm(path, context.device, context.spec.model.dtype)
        self.reference = reference

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        dpo = self.context.spec.dpo
        logps, lengths = labelled_logprobs(model, batch)
        with torch.no_grad():
            ref_logps, _ = labelled_logprobs(self.reference, batch)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, dpo.beta, dpo.label_smoothing, dpo.loss_type,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        )  # fmt: skip
        log_ratio = (logps - ref_logps).detach()
        self.last_metrics = {
            "preference_accuracy": float(pairwise_accuracy(chosen_rewards, rejected_rewards)),
            "reward_mean": float((chosen_rewards - rejected_rewards).mean()),
            "kl": float(log_ratio.sum() / lengths.sum().clamp(min=1)),
        }
        return losses.mean()
