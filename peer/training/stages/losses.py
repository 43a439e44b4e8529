"""Losses and advantages of the preference and RL stages, as pure tensor functions.

A stage owns its model calls and its collation; the arithmetic lives here so that every stage computes a given
objective the same way, and so that each formula can be checked against TRL on identical inputs
(``tests/test_losses.py``, float32, within 1e-5). The docstrings name the TRL code each function reproduces; TRL
moves fast, so they also say which version. Where TRL versions disagree, the docstring says which one is followed.

Conventions: ``B`` is the number of sequences (or preference pairs), ``T`` the number of completion tokens, ``V``
the vocabulary. A ``mask`` is 1 (or True) on completion tokens and 0 on prompt/padding, right-padded. Masked means
divide by ``max(mask.sum(), 1)`` so that an all-padding batch gives 0 rather than NaN, and masked-out positions never
contribute, even if they hold ``inf`` or NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "hinge", "ipo", "robust"]
RewardScaling = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k3"]

GRPO_STD_EPSILON = 1e-4
"""Added to the reward std before dividing (TRL's GRPOTrainer); keeps a zero-variance group at zero advantage."""
WHITEN_EPSILON = 1e-8
"""Added to the variance under the square root in :func:`whiten` (TRL's ``masked_whiten``)."""


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is non-zero (weighted by ``mask``); 0 if there are none."""
    mask = mask.to(values.dtype)
    # where() rather than a bare product: a padded position holding inf would otherwise turn into NaN
    return (torch.where(mask != 0, values, 0.0) * mask).sum() / mask.sum().clamp(min=1.0)


# --------------------------------------------------------------------------------------------- preference pairs


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: DPOLossType = "sigmoid",
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization loss of each pair, and the implicit rewards.

    With the log-ratios ``r_c = policy_chosen - ref_chosen`` and ``r_r = policy_rejected - ref_rejected`` (sequence
    log-probabilities, summed over the completion tokens) and ``d = r_c - r_r``:

    - ``"sigmoid"`` (DPO; cDPO when ``label_smoothing = e > 0``):
      ``-(1 - e) * logsigmoid(beta * d) - e * logsigmoid(-beta * d)``
    - ``"hinge"`` (SLiC): ``relu(1 - beta * d)``
    - ``"ipo"``: ``(d_tok - 1 / (2 * beta)) ** 2`` with ``d_tok = r_c / chosen_lengths - r_r / rejected_lengths``
      (each log-ratio averaged over its completion tokens; ``beta`` is the paper's tau)
    - ``"robust"`` (rDPO, ``e`` = probability that a label is flipped, in [0, 0.5)):
      ``(-(1 - e) * logsigmoid(beta * d) + e * logsigmoid(-beta * d)) / (1 - 2 * e)``

    Matches ``DPOTrainer._compute_loss`` of TRL 1.16 (``trl/trainer/dpo_trainer.py``, ``f_divergence_type=
    "reverse_kl"``, no ``ld_alpha``, no WPO weighting) per pair, before its ``.mean()``. Two version notes:

    - TRL 1.x ignores ``label_smoothing`` for ``"sigmoid"``; TRL 0.x's ``DPOTrainer.dpo_loss`` applied it as cDPO,
      which is what this function does. With the default ``label_smoothing=0`` the two agree.
    - TRL 1.x normalises the IPO log-ratios by the completion token count inside the loss. Pass ``chosen_lengths``
      and ``rejected_lengths`` to do the same; leave them ``None`` when the log-probs given are already per-token
      averages (what TRL 0.x fed its ``dpo_loss`` for IPO) — the loss is then identical.

    Args:
        policy_chosen_logps: ``(B,)`` summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: ``(B,)`` the same for the rejected completions.
        ref_chosen_logps: ``(B,)`` summed log-probs of the chosen completions under the frozen reference.
        ref_rejected_logps: ``(B,)`` the same for the rejected completions.
        beta: Strength of the pull toward the reference (higher: stay closer). Typical 0.1; for IPO, tau.
        label_smoothing: Label noise ``e`` for ``"sigmoid"`` (cDPO) and ``"robust"``; unused by the others.
        loss_type: One of ``"sigmoid"``, ``"hinge"``, ``"ipo"``, ``"robust"``.
        chosen_lengths: ``(B,)`` completion token counts of the chosen sequences; only read by ``"ipo"``.
        rejected_lengths: ``(B,)`` the same for the rejected sequences.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``. The rewards are ``beta * r_c`` and
        ``beta * r_r``, detached (for logging: their difference is the margin, its sign the accuracy).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios

    agree = F.logsigmoid(beta * delta)  # log-likelihood that the label is right
    disagree = F.logsigmoid(-beta * delta)  # ... and that it is flipped
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * agree - label_smoothing * disagree
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if (chosen_lengths is None) != (rejected_lengths is None):
            raise ValueError("ipo: pass both chosen_lengths and rejected_lengths, or neither")
        if chosen_lengths is not None and rejected_lengths is not None:
            chosen_per_token = chosen_logratios / chosen_lengths.clamp(min=1.0)
            delta = chosen_per_token - rejected_logratios / rejected_lengths.clamp(min=1.0)
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = (-(1 - label_smoothing) * agree + label_smoothing * disagree) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected sigmoid, hinge, ipo or robust")

    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Bradley–Terry loss of a reward model on preference pairs (mean over the pairs).

    ``mean(-logsigmoid(chosen - rejected - margin))``, plus, when ``center_rewards_coefficient = c`` is set,
    ``c * mean((chosen + rejected) ** 2)``, which keeps the rewards centred on 0 (Eisenstein et al., 2023) — set it
    (e.g. 0.01) when the rewards drift to large absolute values.

    Matches ``RewardTrainer.compute_loss`` of TRL 1.16 (``trl/trainer/reward_trainer.py``).

    Args:
        chosen_rewards: ``(B,)`` scalar rewards of the chosen completions.
        rejected_rewards: ``(B,)`` scalar rewards of the rejected completions.
        margin: ``(B,)`` optional required margin by which chosen must beat rejected (e.g. from a rating gap).
        center_rewards_coefficient: Weight of the centring penalty; ``None`` for none.

    Returns:
        A scalar tensor.
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    return loss


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose chosen reward is strictly higher (ties count as wrong), as a float scalar.

    Matches the ``accuracy`` metric of ``RewardTrainer.compute_loss`` (TRL 1.16) and DPO's ``rewards/accuracies``.

    Args:
        chosen_rewards: ``(B,)`` rewards of the chosen completions.
        rejected_rewards: ``(B,)`` rewards of the rejected completions.
    """
    return (chosen_rewards > rejected_rewards).float().mean()


# ----------------------------------------------------------------------------------------------------- GRPO


def _nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased (Bessel-corrected) std ignoring NaNs; NaN where fewer than two values are present (TRL's nanstd)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(values), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze(dim) if dim is not None else std.squeeze()


def group_relative_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_rewards: bool | RewardScaling = "group",
    epsilon: float = GRPO_STD_EPSILON,
) -> torch.Tensor:
    """GRPO advantages: each completion's reward relative to the other completions of the same prompt.

    With the rewards viewed as ``(num_prompts, group_size)``: ``A = (r - mean_group(r)) / (std + epsilon)`` where
    ``std`` is the unbiased (Bessel-corrected) std of the group (``"group"``, or ``True``), of the whole batch
    (``"batch"``), or no division at all (``"none"``, or ``False``; Dr. GRPO). A group whose rewards are all equal gets
    zero advantages (not NaN): ``0 / (0 + epsilon)``. NaN rewards (a completion no reward function could score) are
    left out of the means and stds, and their advantage is 0. A ``group_size`` of 1 (or a batch of one, for
    ``"batch"``) has std 0.

    Matches ``GRPOTrainer._generate_and_score_completions`` of TRL 1.16 (``trl/trainer/grpo_trainer.py``,
    ``multi_objective_aggregation="sum_then_normalize"``, i.e. with the reward functions already summed).

    Args:
        rewards: ``(num_prompts * group_size,)`` total reward per completion, the ``group_size`` completions of a
            prompt contiguous (as TRL's ``repeat_interleave`` of the prompts lays them out).
        group_size: Completions per prompt (TRL's ``num_generations``).
        scale_rewards: ``"group"``/``True``, ``"batch"`` or ``"none"``/``False``.
        epsilon: Added to the std; larger values damp the advantages of near-uniform groups.

    Returns:
        ``(num_prompts * group_size,)`` advantages, one per completion (broadcast over its tokens by the loss).
    """
    scaling = "group" if scale_rewards is True else "none" if scale_rewards is False else scale_rewards
    if scaling not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch', 'none' or a bool, got {scale_rewards!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, got {tuple(rewards.shape)}"
        )

    grouped = rewards.view(-1, group_size)
    group_mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    advantages = rewards - group_mean
    if scaling == "group":
        std = torch.zeros_like(rewards)
        if group_size > 1:
            std = _nanstd(grouped, dim=1).repeat_interleave(group_size)
        advantages = advantages / (std + epsilon)
    elif scaling == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + epsilon)
    return torch.nan_to_num(advantages, nan=0.0)


# ------------------------------------------------------------------------------------------------------ KL


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLEstimator = "k3") -> torch.Tensor:
    """Per-token Monte-Carlo estimate of KL(policy || reference) from the sampled tokens' log-probs.

    With ``log_r = ref_logprobs - logprobs`` (Schulman, "Approximating KL divergence"):

    - ``"k1"``: ``-log_r``. Unbiased, high variance, can be negative per token. TRL's RLOO
      (``trl/trainer/rloo_trainer.py``, ``old_per_token_logps - ref_per_token_logps``) and PPO's default.
    - ``"k3"``: ``exp(log_r) - log_r - 1``. Unbiased, lower variance, never negative. TRL's GRPO
      (``GRPOTrainer._compute_loss``) and PPO with ``kl_estimator="k3"``.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy.
        ref_logprobs: ``(B, T)`` log-probs of the same tokens under the reference.
        kind: ``"k1"`` or ``"k3"``.

    Returns:
        ``(B, T)`` per-token estimates; mask and reduce them as the objective needs.
    """
    log_ratio = ref_logprobs - logprobs
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1' or 'k3'")


# ------------------------------------------------------------------------------------------------------ PPO


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
) -> torch.Tensor:
    """PPO clipped surrogate loss, masked mean over the tokens.

    ``ratio = exp(logprobs - old_logprobs)``;
    ``loss = masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range_high)))``.
    The max of the negated objectives is the min of the objectives, i.e. the pessimistic bound.

    Matches the policy loss of TRL's PPOTrainer (``trl/experimental/ppo/ppo_trainer.py``, ``pg_loss``; no longer
    shipped in TRL 1.16) and, with ``clip_range_high`` as ``epsilon_high``, the per-token loss of TRL 1.16's
    ``GRPOTrainer._compute_loss`` for ``loss_type="bnpo"`` (``-min(coef_1 * A, coef_2 * A)``, token-level
    importance sampling, ``beta=0``). An empty mask gives 0 here (TRL's PPO would give NaN).

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the current policy (with a graph).
        old_logprobs: ``(B, T)`` the same under the policy that sampled them (detached).
        advantages: ``(B, T)`` per-token advantages, or ``(B,)`` per-sequence ones (GRPO), broadcast over ``T``.
        mask: ``(B, T)`` 1 on completion tokens.
        clip_range: ``epsilon``; the ratio is kept within ``[1 - clip_range, 1 + clip_range]``. Typical 0.2; lower it
            if the clip fraction stays high and the policy collapses.
        clip_range_high: Upper ``epsilon`` if different (DAPO's clip-higher, e.g. 0.28); ``None`` means
            ``clip_range``.

    Returns:
        A scalar tensor.
    """
    unclipped, clipped = _ppo_terms(logprobs, old_logprobs, advantages, clip_range, clip_range_high)
    return _masked_mean(torch.max(unclipped, clipped), mask)


def _ppo_terms(logprobs, old_logprobs, advantages, clip_range, clip_range_high):
    """The negated unclipped and clipped surrogate objectives per token (see :func:`ppo_policy_loss`)."""
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    upper = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp(logprobs - old_logprobs)
    return -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + upper)


@torch.no_grad()
def ppo_clip_fraction(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
) -> torch.Tensor:
    """Share of the masked tokens whose term in :func:`ppo_policy_loss` is the clipped one (no gradient flows).

    ``masked_mean(-A * clamp(ratio, ...) > -A * ratio)``: the ratio left ``[1 - clip_range, 1 + clip_range_high]``
    on the side where the advantage would push it further. Matches ``pg_clipfrac`` of TRL's PPOTrainer
    (``trl/experimental/ppo/ppo_trainer.py``) and ``clip_ratio/region_mean`` of TRL 1.16's GRPOTrainer. Always 0
    when the ratio is 1 (on-policy, ``rl.updates_per_rollout = 1``); a value that stays high means the updates
    between uses of a rollout are too large (lower the lr or ``updates_per_rollout``). Arguments as there.
    """
    unclipped, clipped = _ppo_terms(logprobs, old_logprobs, advantages, clip_range, clip_range_high)
    return _masked_mean((clipped > unclipped).to(logprobs.dtype), mask)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> torch.Tensor:
    """PPO clipped value loss, masked mean over the tokens.

    ``v_clip = clamp(values, old_values - c, old_values + c)``;
    ``loss = 0.5 * masked_mean(max((values - returns) ** 2, (v_clip - returns) ** 2))``.

    Matches ``vf_loss`` of TRL's PPOTrainer (``trl/experimental/ppo/ppo_trainer.py``; no longer shipped in TRL 1.16).

    Args:
        values: ``(B, T)`` value-head predictions of the current model (with a graph).
        old_values: ``(B, T)`` the predictions made at rollout time (detached).
        returns: ``(B, T)`` regression targets, from :func:`gae_advantages`.
        mask: ``(B, T)`` 1 where the value counts (TRL uses the completion plus one position).
        clip_range_value: ``c``, how far a value may move from ``old_values`` per update (TRL default 0.2; scale it
            with the rewards' magnitude).

    Returns:
        A scalar tensor.
    """
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    loss = torch.max(torch.square(values - returns), torch.square(clipped_values - returns))
    return 0.5 * _masked_mean(loss, mask)


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the tokens of each sequence.

    Rewards and values outside ``mask`` are taken as 0 (so nothing is bootstrapped from padding), then, backward in
    time, ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V_T = A_T = 0`` past the last position. ``returns = A + V``. Both are 0 outside ``mask``.

    Matches step 6 ("compute advantages and returns") of ``PPOTrainer.train`` in TRL's
    ``trl/experimental/ppo/ppo_trainer.py`` (no longer shipped in TRL 1.16), before it whitens the advantages —
    call :func:`whiten` for that.

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. ``-kl_coef * kl_estimate(...)``, plus the score on the last
            token).
        values: ``(B, T)`` value-head predictions at rollout time.
        mask: ``(B, T)`` 1 on the positions that belong to the sequence, right-padded (holes are treated as
            zero-reward, zero-value steps).
        gamma: Discount per token (TRL default 1.0).
        lam: GAE lambda (TRL default 0.95): lower means less variance, more bias.

    Returns:
        ``(advantages, returns)``, each ``(B, T)``.
    """
    mask = mask.to(values.dtype)
    rewards = torch.where(mask != 0, rewards, 0.0) * mask
    values = torch.where(mask != 0, values, 0.0) * mask
    length = rewards.shape[-1]
    last_advantage = torch.zeros_like(rewards[..., 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_values = values[..., t + 1] if t < length - 1 else 0.0
        delta = rewards[..., t] + gamma * next_values - values[..., t]
        last_advantage = delta + gamma * lam * last_advantage
        reversed_advantages.append(last_advantage)
    advantages = torch.stack(reversed_advantages[::-1], dim=-1)
    returns = advantages + values
    return advantages * mask, returns * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``values`` to zero mean and unit variance over the masked positions.

    ``(values - mean) / sqrt(var + 1e-8)`` with the masked mean and the unbiased (Bessel-corrected) masked variance;
    with ``shift_mean=False`` the mean is added back (only the scale changes; TRL whitens rewards that way).
    Positions outside ``mask`` are 0.

    Matches TRL's ``masked_whiten`` followed by ``masked_fill(~mask, 0)``, as both its call sites in
    ``PPOTrainer.train`` do (``trl/experimental/ppo/ppo_trainer.py``; earlier ``trl/core.py`` ``whiten``).

    Args:
        values: ``(B, T)`` advantages or rewards.
        mask: ``(B, T)`` 1 where the values count.
        shift_mean: Whether the result is centred (advantages) or keeps its mean (rewards).

    Returns:
        ``(B, T)`` whitened values.

    Raises:
        ValueError: fewer than two positions are masked in, so the variance is undefined (grow the mini-batch).
    """
    mask = mask.to(values.dtype)
    count = mask.sum()
    if count < 2:
        raise ValueError(f"whiten needs at least two masked-in positions, got {count.item():g}")
    kept = torch.where(mask != 0, values, 0.0)
    mean = (kept * mask).sum() / count
    variance = (torch.where(mask != 0, (values - mean) ** 2, 0.0) * mask).sum() / count
    variance = variance * (count / (count - 1))
    whitened = (values - mean) * torch.rsqrt(variance + WHITEN_EPSILON)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, 0.0)


# ----------------------------------------------------------------------------------------------- distillation


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Knowledge-distillation loss: KL(teacher || student) between temperature-softened next-token distributions.

    ``p = softmax(teacher / tau)``, ``log_q = log_softmax(student / tau)``;
    ``loss = tau**2 * masked_mean_tokens(sum_v p * (log p - log_q))``. The ``tau**2`` factor (Hinton et al., 2015)
    keeps the gradient scale independent of ``tau``, so the loss can be mixed with a hard-label loss without
    retuning.

    Equals ``tau**2`` times TRL 1.16's ``GKDTrainer.generalized_jsd_loss(beta=0, temperature=tau, labels=...)``
    (``trl/experimental/gkd/gkd_trainer.py``) and ``_chunked_divergence_loss(beta=0)`` of its
    ``DistillationTrainer`` (``trl/trainer/distillation_trainer.py``): TRL divides by the temperature but does not
    multiply by ``tau**2`` (identical at ``tau=1``). Without ``mask`` this is a per-token mean; GKD without labels
    divides the sum by the batch size instead.

    Args:
        student_logits: ``(..., V)`` logits of the student (with a graph), e.g. ``(B, T, V)``.
        teacher_logits: ``(..., V)`` logits of the teacher on the same positions (detach them).
        temperature: ``tau``; above 1 exposes more of the teacher's ranking of the unlikely tokens.
        mask: ``(...)`` 1 on the positions that count (e.g. ``(B, T)``); ``None`` for all.

    Returns:
        A scalar tensor.
    """
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    per_token = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    mean = per_token.mean() if mask is None else _masked_mean(per_token, mask)
    return temperature**2 * mean
