"""The RL stages on prompt-only data: ``grpo`` (group-relative advantages, no critic) and ``ppo`` (actor-critic, GAE).

One local step of either: sample completions of this peer's prompts with the current policy (KV-cached
``generate``), score them (``rl.reward``: the verifiable ``exact_answer`` or a reward model), compute log-probs
under the policy (with a graph) and the frozen reference, and return the clipped policy loss (plus, for PPO, the
clipped value loss). Gradients are averaged by the swarm like any run; rollouts stay on the peer.

NOTE: each rollout batch is used for one gradient computation, and parameters change only at global steps, so the
policy that sampled a batch is the one being updated: the importance ratio is 1 and clipping is inactive (the
objective is the on-policy policy gradient, as TRL's GRPO with ``num_iterations=1``). The clipped forms are kept so
that reusing rollouts over several updates (TODO: a rollout buffer; it needs an optimizer step between uses, i.e.
a global step) changes no loss code.
"""

from __future__ import annotations

from typing import Any

import torch

from potluck.peer.stages.base import Stage, StageContext
from potluck.peer.stages.losses import (
    _masked_mean,
    gae_advantages,
    group_relative_advantages,
    kl_estimate,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from potluck.peer.stages.models import ActorCritic, gather_logprobs, load_frozen_causal_lm, resolve_weights
from potluck.peer.stages.rollout import (
    Rollouts,
    completion_logits,
    generate_rollouts,
    make_reward,
    repeat_prompts,
)


class RLStage(Stage):
    """What GRPO and PPO share: the reference, the reward, rollouts and their metrics."""

    samples_per_prompt = 1

    def __init__(self, context: StageContext):
        super().__init__(context)
        spec = context.spec
        path = resolve_weights(spec.reference.path or context.start_model.name_or_path, context.save_dir,
                               "reference.path")  # fmt: skip
        self.reference = load_frozen_causal_lm(path, context.device, spec.model.dtype)
        self.reward = make_reward(spec.rl, context.save_dir, context.device)

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

    def record(
        self, rollouts: Rollouts, rewards: torch.Tensor, kl: torch.Tensor, **losses: torch.Tensor
    ) -> None:
        seconds = rollouts.generation_seconds
        self.last_metrics = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "kl": float(kl),
            "rollout_tokens_per_second": rollouts.generated_tokens / seconds if seconds > 0 else 0.0,
            "generation_seconds": seconds,
            **{name: float(value) for name, value in losses.items()},
        }


class GroupRelativePolicyOptimization(RLStage):
    """GRPO: ``rl.group_size`` completions per prompt; each one's advantage is its reward relative to its group
    (TRL's scaling by the group std). Loss: clipped policy loss + ``rl.kl_coef`` * KL(policy || reference) with the
    ``rl.kl_estimator`` estimator, both a mean over completion tokens (TRL's ``bnpo``). If ``reward_std`` is ~0
    (every group all right or all wrong), raise ``rl.temperature`` or ``rl.group_size``."""

    def __init__(self, context: StageContext):
        super().__init__(context)
        self.samples_per_prompt = context.spec.rl.group_size

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        rl = self.context.spec.rl
        rollouts, rewards = self.rollouts(model, batch)
        advantages = group_relative_advantages(rewards, rl.group_size)
        ref_logprobs = self.reference_logprobs(rollouts)
        logits, _ = completion_logits(model, rollouts, rl.temperature)
        logprobs = gather_logprobs(logits, rollouts.completion_ids)
        mask = rollouts.completion_mask
        policy_loss = ppo_policy_loss(logprobs, logprobs.detach(), advantages, mask, rl.clip_range)
        kl = _masked_mean(kl_estimate(logprobs, ref_logprobs, rl.kl_estimator), mask)
        self.record(rollouts, rewards, kl.detach(), policy_loss=policy_loss.detach())
        return policy_loss + rl.kl_coef * kl


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

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        rl = self.context.spec.rl
        rollouts, scores = self.rollouts(model, batch)
        ref_logprobs = self.reference_logprobs(rollouts)
        logits, (_, all_values) = completion_logits(model, rollouts, rl.temperature)
        logprobs = gather_logprobs(logits, rollouts.completion_ids)
        values = all_values[:, rollouts.prompt_width - 1 : -1]
        mask = rollouts.completion_mask
        old_logprobs, old_values = logprobs.detach(), values.detach()

        kl = (old_logprobs - ref_logprobs) * mask  # k1, as TRL's PPO puts it in the reward
        rewards = -rl.kl_coef * kl
        last = (mask.sum(-1) - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += scores
        advantages, returns = gae_advantages(rewards, old_values, mask, rl.gamma, rl.lam)
        if mask.sum() >= 2:
            advantages = whiten(advantages, mask)
        policy_loss = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, rl.clip_range)
        value_loss = ppo_value_loss(values, old_values, returns, mask, rl.clip_range_value)
        mean_kl = kl.sum() / mask.sum().clamp(min=1)
        self.record(
            rollouts, scores, mean_kl, policy_loss=policy_loss.detach(), value_loss=value_loss.detach()
        )
        return policy_loss + rl.vf_coef * value_loss
