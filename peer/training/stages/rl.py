"""The RL stages on prompt-only data: ``grpo`` (group-relative advantages, no critic) and ``ppo`` (actor-critic, GAE).

One local step of either: sample completions of this peer's prompts with the current policy (KV-cached
``generate``), score them (``rl.reward``: the verifiable ``exact_answer`` or a reward model), compute log-probs
under the policy (with a graph) and the frozen reference, and return the clipped policy loss (plus, for PPO, the
clipped value loss). Gradients are averaged by the swarm like any run; rollouts stay on the peer.

Rollout reuse (``rl.updates_per_rollout = N``, TRL's ``num_ppo_epochs`` / ``num_iterations``): the rollouts, with
what was computed from the policy that sampled them (its log-probs, PPO's values, the rewards, advantages and
returns), form a buffer that the next ``N`` local steps train on; only the current log-probs (and values) are
recomputed, with a graph, at each step. The swarm's optimizer steps only at global steps (hivemind accumulates
gradients up to ``target_batch_size``), so the importance ratio departs from 1, and clipping acts, only on the
uses of a buffer that come after a global step; within one global step the reuses are plain extra gradient
samples of the same rollouts. With ``N = 1`` (the default) each batch is fresh, the ratio is 1 and the objective is
the on-policy policy gradient (TRL's GRPO with ``num_iterations=1``). During reuse the trainer's batches of
prompts are skipped (they still count toward ``target_batch_size``, as TRL counts each epoch's samples).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from potluck.peer.training.stages.base import Stage, StageContext
from potluck.peer.training.stages.losses import (
    _masked_mean,
    gae_advantages,
    group_relative_advantages,
    kl_estimate,
    ppo_clip_fraction,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from potluck.peer.training.stages.models import (
    ActorCritic,
    gather_logprobs,
    load_frozen_causal_lm,
    resolve_weights,
)
from potluck.peer.training.stages.rollout import (
    Rollouts,
    completion_logits,
    generate_rollouts,
    make_reward,
    repeat_prompts,
)


@dataclass
class RolloutBuffer:
    """One rollout batch and what the policy that sampled it gave (all detached), kept for ``uses_left`` more
    local steps."""

    rollouts: Rollouts
    scores: torch.Tensor
    """``(N,)`` reward of each completion."""
    ref_logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    """``(N, L)`` log-probs of the completion tokens under the sampling policy."""
    old_values: torch.Tensor | None
    """``(N, L)`` PPO value predictions at rollout time; ``None`` for GRPO."""
    uses_left: int
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    """PPO: the mean rollout-time k1 KL that went into the rewards."""


class RLStage(Stage):
    """What GRPO and PPO share: the reference, the reward, the rollout buffer, the clipped policy loss and the
    metrics. A subclass says how rollouts turn into advantages (:meth:`score`) and what it adds to the policy loss
    (:meth:`objective`)."""

    samples_per_prompt = 1

    def __init__(self, context: StageContext):
        super().__init__(context)
        spec = context.spec
        path = resolve_weights(spec.reference.path or context.start_model.name_or_path, context.save_dir,
                               "reference.path")  # fmt: skip
        self.reference = load_frozen_causal_lm(path, context.device, spec.model.dtype)
        self.reward = make_reward(spec.rl, context.save_dir, context.device)
        self.buffer: RolloutBuffer | None = None
        """The rollouts the next local step trains on while ``buffer.uses_left > 0``."""

    def batch_size(self, batch: dict[str, Any]) -> int:
        """Prompts, not completions: ``target_batch_size`` counts prompts (GRPO samples ``group_size`` each)."""
        return int(batch["prompt_ids"].shape[0])

    def rollouts(self, model, batch: dict[str, Any]) -> tuple[Rollouts, torch.Tensor]:
        """Sample ``samples_per_prompt`` completions per prompt and score them: ``(rollouts, rewards (N,))``."""
        rl = self.context.spec.rl
        prompt_ids, prompt_mask, prompts, answers = repeat_prompts(batch, self.samples_per_prompt)
        rollouts = generate_rollouts(
            model, self.context.tokenizer, prompt_ids, prompt_mask, rl.max_new_tokens, rl.temperature
        )
        rewards = self.reward(prompts, rollouts.completions, answers).to(prompt_ids.device)
        return rollouts, rewards

    def reference_logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        with torch.no_grad():
            logits, _ = completion_logits(self.reference, rollouts, self.context.spec.rl.temperature)
            return gather_logprobs(logits, rollouts.completion_ids)

    def values(self, output, rollouts: Rollouts) -> torch.Tensor | None:
        """The critic's predictions at the completion tokens from the model's output; ``None`` without a critic."""
        return None

    @abstractmethod
    def score(self, buffer: RolloutBuffer) -> None:
        """Fill ``buffer.advantages`` (and what else :meth:`objective` reads) from the rollout-time figures."""

    @abstractmethod
    def objective(
        self, buffer: RolloutBuffer, logprobs: torch.Tensor, values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """What the stage adds to the policy loss: ``(term, kl for the metrics, named losses for the metrics)``."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Clipped policy loss (plus the stage's term) on the buffered rollouts, sampling a new buffer from
        ``batch`` when the last one is used up; ``batch`` is ignored while a buffer is reused. A buffer outlives a
        global step or a state download from peers on purpose: that is when the ratio leaves 1, and the clip
        bounds how far a stale buffer can pull."""
        rl = self.context.spec.rl
        fresh = self.buffer is None or self.buffer.uses_left == 0
        if fresh:
            rollouts, scores = self.rollouts(model, batch)
            ref_logprobs = self.reference_logprobs(rollouts)
        else:
            rollouts = self.buffer.rollouts
        logits, output = completion_logits(model, rollouts, rl.temperature)
        logprobs = gather_logprobs(logits, rollouts.completion_ids)
        values = self.values(output, rollouts)
        if fresh:
            # the policy has not changed since it sampled, so this step's forward gives the "old" figures too
            old_values = values.detach() if values is not None else None
            self.buffer = RolloutBuffer(
                rollouts, scores, ref_logprobs, logprobs.detach(), old_values, rl.updates_per_rollout
            )
            self.score(self.buffer)
        buffer = self.buffer
        buffer.uses_left -= 1
        mask = rollouts.completion_mask
        policy_loss = ppo_policy_loss(logprobs, buffer.old_logprobs, buffer.advantages, mask, rl.clip_range)
        term, kl, losses = self.objective(buffer, logprobs, values)
        with torch.no_grad():
            ratio = torch.exp(logprobs - buffer.old_logprobs)
            self.record(
                rollouts,
                buffer.scores,
                kl.detach(),
                fresh,
                policy_loss=policy_loss.detach(),
                clip_fraction=ppo_clip_fraction(
                    logprobs, buffer.old_logprobs, buffer.advantages, mask, rl.clip_range
                ),
                ratio_mean=_masked_mean(ratio, mask),
                **{name: value.detach() for name, value in losses.items()},
            )
        return policy_loss + term

    def record(
        self,
        rollouts: Rollouts,
        rewards: torch.Tensor,
        kl: torch.Tensor,
        fresh: bool,
        **figures: torch.Tensor,
    ) -> None:
        seconds = rollouts.generation_seconds
        self.last_metrics = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "kl": float(kl),
            "rollout_tokens_per_second": rollouts.generated_tokens / seconds if seconds > 0 else 0.0,
            # a reused buffer cost no generation this step (generation_time_share)
            "generation_seconds": seconds if fresh else 0.0,
            **{name: float(value) for name, value in figures.items()},
        }


class GroupRelativePolicyOptimization(RLStage):
    """GRPO: ``rl.group_size`` completions per prompt; each one's advantage is its reward relative to its group
    (TRL's scaling by the group std). Loss: clipped policy loss + ``rl.kl_coef`` * KL(policy || reference) with the
    ``rl.kl_estimator`` estimator, both a mean over completion tokens (TRL's ``bnpo``). If ``reward_std`` is ~0
    (every group all right or all wrong), raise ``rl.temperature`` or ``rl.group_size``."""

    def __init__(self, context: StageContext):
        super().__init__(context)
        self.samples_per_prompt = context.spec.rl.group_size

    def score(self, buffer: RolloutBuffer) -> None:
        buffer.advantages = group_relative_advantages(buffer.scores, self.context.spec.rl.group_size)

    def objective(self, buffer, logprobs, values):
        rl = self.context.spec.rl
        kl = _masked_mean(
            kl_estimate(logprobs, buffer.ref_logprobs, rl.kl_estimator), buffer.rollouts.completion_mask
        )
        return rl.kl_coef * kl, kl, {}


class ProximalPolicyOptimization(RLStage):
    """PPO as in InstructGPT step 3: one completion per prompt; per-token reward ``-rl.kl_coef * k1 KL`` plus the
    score on the last completion token; GAE (``rl.gamma``, ``rl.lam``) over value-head predictions; whitened
    advantages; loss = clipped policy loss + ``rl.vf_coef`` * clipped value loss. If ``kl`` keeps rising while
    ``reward_mean`` does, the policy is gaming the reward: raise ``rl.kl_coef``."""

    def build_model(self, weights_from: str | None = None) -> torch.nn.Module:
        context = self._require_context()
        policy = super().build_model(weights_from)
        torch.manual_seed(context.spec.seed)  # the same fresh value head on every peer
        model = ActorCritic(policy)
        if weights_from:
            model.load_value_head(weights_from)
        return model.train()

    def values(self, output, rollouts: Rollouts) -> torch.Tensor:
        _, all_values = output
        return all_values[:, rollouts.prompt_width - 1 : -1]

    def score(self, buffer: RolloutBuffer) -> None:
        rl = self.context.spec.rl
        mask = buffer.rollouts.completion_mask
        kl = (buffer.old_logprobs - buffer.ref_logprobs) * mask  # k1, as TRL's PPO puts it in the reward
        rewards = -rl.kl_coef * kl
        last = (mask.sum(-1) - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += buffer.scores
        advantages, buffer.returns = gae_advantages(rewards, buffer.old_values, mask, rl.gamma, rl.lam)
        buffer.advantages = whiten(advantages, mask) if mask.sum() >= 2 else advantages
        buffer.kl = kl.sum() / mask.sum().clamp(min=1)

    def objective(self, buffer, logprobs, values):
        rl = self.context.spec.rl
        mask = buffer.rollouts.completion_mask
        value_loss = ppo_value_loss(values, buffer.old_values, buffer.returns, mask, rl.clip_range_value)
        return rl.vf_coef * value_loss, buffer.kl, {"value_loss": value_loss}
