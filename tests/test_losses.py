"""The stage losses equal TRL's on identical inputs (float32, within 1e-5).

Where TRL exposes a computation as something callable (a static method, a module function, or a trainer method that
reads only a few attributes), the test calls TRL itself, on a stub carrying those attributes. Where the computation
sits inline in a long method, the test reproduces TRL's lines as the reference, cites file and method, and checks
that those lines are still in the installed TRL's source, so that the reference cannot go stale unnoticed.
PPO is no longer shipped in TRL 1.16 (the version these tests were written against); its lines are quoted from
huggingface/trl ``trl/experimental/ppo/ppo_trainer.py`` at commit 0062ee10a9bc59dbb7ba244f3bbaf2e81f25196f.
"""

from __future__ import annotations

import inspect
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from potluck.peer.training.stages.losses import (
    distillation_kl,
    dpo_loss,
    gae_advantages,
    group_relative_advantages,
    kl_estimate,
    pairwise_accuracy,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)

pytestmark = pytest.mark.unit

dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
reward_trainer = pytest.importorskip("trl.trainer.reward_trainer")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
rloo_trainer = pytest.importorskip("trl.trainer.rloo_trainer")
distillation_trainer = pytest.importorskip("trl.trainer.distillation_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")
gkd_trainer = pytest.importorskip("trl.experimental.gkd.gkd_trainer")

TOLERANCE = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=TOLERANCE)


def assert_in_trl_source(function: object, *lines: str) -> None:
    """The reproduced reference lines are still what the installed TRL runs (whitespace-insensitive)."""
    source = re.sub(r"\s+", " ", inspect.getsource(function))
    for line in lines:
        assert re.sub(r"\s+", " ", line) in source, f"TRL changed; update the reference: {line}"


def trainer_stub(**attributes: object) -> SimpleNamespace:
    """The attributes a TRL trainer's loss method reads besides its config: one CPU process, empty metrics."""
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t
    )
    return SimpleNamespace(
        accelerator=accelerator,
        model=SimpleNamespace(training=True),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **attributes,
    )


def right_padded_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width) < lengths[:, None]


# --------------------------------------------------------------------------------------------------------- DPO


def make_dpo_batch(pairs: int, prompt_len: int, completion_len: int, seed: int) -> dict[str, torch.Tensor]:
    """A DPO batch as DPOTrainer sees it: rows [chosen..., rejected...], per-token log-probs of the policy."""
    g = torch.Generator().manual_seed(seed)
    width = prompt_len + completion_len
    lengths = torch.randint(1, completion_len + 1, (2 * pairs,), generator=g)
    positions = torch.arange(width)
    completion_mask = ((positions >= prompt_len) & (positions < prompt_len + lengths[:, None])).long()
    # the fused LM head gives 0 where the label is -100, so the sum over the row is the completion's log-prob
    per_token_logps = -3 * torch.rand(2 * pairs, width - 1, generator=g) * completion_mask[:, 1:]
    ref_logps = per_token_logps.sum(1) + 2 * torch.randn(2 * pairs, generator=g)
    return {
        "input_ids": torch.randint(0, 50, (2 * pairs, width), generator=g),
        "attention_mask": torch.ones(2 * pairs, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "per_token_logps": per_token_logps,
        "ref_logps": ref_logps,
    }


def trl_dpo(batch: dict[str, torch.Tensor], rows: list[int], **config: object) -> tuple[torch.Tensor, dict]:
    """TRL 1.16 ``DPOTrainer._compute_loss``, called on a stub (precomputed reference log-probs)."""
    pairs = len(rows) // 2
    per_token_logps = batch["per_token_logps"][rows]

    def fake_model(**_kwargs: object) -> SimpleNamespace:
        zeros = torch.zeros_like(per_token_logps)
        return SimpleNamespace(
            log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    stub = trainer_stub(
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        loss_weights=[1.0],
        args=SimpleNamespace(),
        **config,
    )
    inputs = {key: batch[key][rows] for key in ("input_ids", "attention_mask", "completion_mask")}
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = batch["ref_logps"][rows].split(pairs)
    loss = dpo_trainer.DPOTrainer._compute_loss(stub, fake_model, inputs, return_outputs=False)
    return loss, stub._metrics["train"]


def ours_dpo(batch: dict[str, torch.Tensor], **kwargs: object):
    pairs = batch["per_token_logps"].shape[0] // 2
    chosen, rejected = batch["per_token_logps"].sum(1).split(pairs)
    ref_chosen, ref_rejected = batch["ref_logps"].split(pairs)
    chosen_lengths, rejected_lengths = batch["completion_mask"].sum(1).split(pairs)
    return dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        **kwargs,
    )


DPO_SHAPES = [(1, 3, 5), (4, 2, 7), (7, 4, 12)]  # (pairs, prompt tokens, completion tokens)


@pytest.mark.parametrize(("pairs", "prompt_len", "completion_len"), DPO_SHAPES)
@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing"),
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.0),
        ("hinge", 0.1, 0.0),
        ("ipo", 0.1, 0.0),
        ("robust", 0.1, 0.2),
    ],
)
def test_dpo_loss_matches_trl(pairs, prompt_len, completion_len, loss_type, beta, label_smoothing) -> None:
    batch = make_dpo_batch(pairs, prompt_len, completion_len, seed=pairs * 100 + completion_len)
    config = {"beta": beta, "label_smoothing": label_smoothing}
    losses, chosen_rewards, rejected_rewards = ours_dpo(batch, loss_type=loss_type, **config)
    assert losses.shape == (pairs,)

    for i in range(pairs):  # TRL returns the batch mean: one pair per call gives each pair's loss
        trl_loss, metrics = trl_dpo(batch, [i, pairs + i], loss_types=[loss_type], **config)
        assert_close(losses[i], trl_loss)
        assert_close(chosen_rewards[i], torch.tensor(metrics["rewards/chosen"][0]))
        assert_close(rejected_rewards[i], torch.tensor(metrics["rewards/rejected"][0]))
    trl_loss, metrics = trl_dpo(batch, list(range(2 * pairs)), loss_types=[loss_type], **config)
    assert_close(losses.mean(), trl_loss)
    assert_close(
        pairwise_accuracy(chosen_rewards, rejected_rewards), torch.tensor(metrics["rewards/accuracies"][0])
    )


def test_ipo_on_per_token_averages_matches_trl() -> None:
    """Without lengths, IPO expects per-token-averaged log-probs (TRL 0.x); the loss equals TRL 1.x's."""
    batch = make_dpo_batch(5, 3, 9, seed=7)
    pairs = 5
    lengths = batch["completion_mask"].sum(1).float()
    policy = (batch["per_token_logps"].sum(1) / lengths).split(pairs)
    ref = (batch["ref_logps"] / lengths).split(pairs)
    losses, _, _ = dpo_loss(*policy, *ref, beta=0.1, loss_type="ipo")
    trl_loss, _ = trl_dpo(batch, list(range(2 * pairs)), loss_types=["ipo"], beta=0.1, label_smoothing=0.0)
    assert_close(losses.mean(), trl_loss)


def test_dpo_sigmoid_label_smoothing_is_conservative_dpo() -> None:
    batch = make_dpo_batch(6, 2, 8, seed=3)
    losses, _, _ = ours_dpo(batch, beta=0.1, label_smoothing=0.1, loss_type="sigmoid")

    # Reference: TRL 0.x DPOTrainer.dpo_loss, the "sigmoid" branch (cDPO), quoted:
    #     losses = (
    #         -F.logsigmoid(self.beta * logits) * (1 - self.label_smoothing)
    #         - F.logsigmoid(-self.beta * logits) * self.label_smoothing
    #     )
    pairs = 6
    chosen, rejected = batch["per_token_logps"].sum(1).split(pairs)
    ref_chosen, ref_rejected = batch["ref_logps"].split(pairs)
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    expected = -F.logsigmoid(0.1 * logits) * (1 - 0.1) - F.logsigmoid(-0.1 * logits) * 0.1
    assert_close(losses, expected)

    # TRL 1.16 ignores label_smoothing for "sigmoid": its loss is plain DPO (the documented discrepancy)
    plain, _, _ = ours_dpo(batch, beta=0.1, label_smoothing=0.0, loss_type="sigmoid")
    trl_loss, _ = trl_dpo(
        batch, list(range(2 * pairs)), loss_types=["sigmoid"], beta=0.1, label_smoothing=0.1
    )
    assert_close(plain.mean(), trl_loss)
    assert (losses - plain).abs().max() > 1e-3


def test_dpo_rejects_unknown_loss_type_and_bad_smoothing() -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="exo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5, loss_type="robust")


# ---------------------------------------------------------------------------------------------- reward model


@pytest.mark.parametrize("pairs", [1, 5, 16])
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center_rewards_coefficient", [None, 0.01])
def test_pairwise_reward_loss_matches_trl(pairs, with_margin, center_rewards_coefficient) -> None:
    g = torch.Generator().manual_seed(pairs)
    chosen, rejected = 2 * torch.randn(2, pairs, generator=g)
    rejected[::3] = chosen[::3]  # ties: a tie is not a correct ranking
    margin = torch.rand(pairs, generator=g) if with_margin else None

    def fake_reward_model(**_kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])

    inputs = {"attention_mask": torch.ones(2 * pairs, 4, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    stub = trainer_stub(args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient))
    expected = reward_trainer.RewardTrainer.compute_loss(stub, fake_reward_model, inputs)

    assert_close(pairwise_reward_loss(chosen, rejected, margin, center_rewards_coefficient), expected)
    assert_close(pairwise_accuracy(chosen, rejected), torch.tensor(stub._metrics["train"]["accuracy"][0]))


# ------------------------------------------------------------------------------------------------------ GRPO


def trl_group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """Reproduced from TRL 1.16 trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions
    (multi_objective_aggregation="sum_then_normalize"), calling TRL's own nanstd."""
    nanstd = trl_utils.nanstd
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        if rewards.numel() > 1:  # noqa: SIM108 (TRL's lines, verbatim)
            std_rewards = nanstd(rewards).expand_as(rewards)
        else:
            std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages


def test_grpo_reference_is_current_trl() -> None:
    assert_in_trl_source(
        grpo_trainer.GRPOTrainer._generate_and_score_completions,
        "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
        "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)",
        "std_rewards = nanstd(rewards).expand_as(rewards)",
        "advantages = rewards - mean_grouped_rewards",
        'if self.scale_rewards != "none": advantages = advantages / (std_rewards + 1e-4)',
        "advantages = torch.nan_to_num(advantages, nan=0.0)",
    )
    # GRPOConfig maps the booleans onto the strings
    assert_in_trl_source(
        grpo_trainer.GRPOConfig.__post_init__,
        'self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)',
    )


@pytest.mark.parametrize(("num_prompts", "group_size"), [(1, 2), (3, 4), (5, 8), (4, 1), (1, 16)])
@pytest.mark.parametrize("scale_rewards", [True, False, "group", "batch", "none"])
def test_group_relative_advantages_match_trl(num_prompts, group_size, scale_rewards) -> None:
    g = torch.Generator().manual_seed(num_prompts * 31 + group_size)
    rewards = torch.randn(num_prompts * group_size, generator=g)
    if num_prompts > 2 and group_size > 1:
        rewards[:group_size] = 0.5  # a group whose completions all scored the same
        rewards[group_size + 1] = float("nan")  # an unscorable completion
    expected = trl_group_advantages(
        rewards, group_size, {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    )
    actual = group_relative_advantages(rewards, group_size, scale_rewards)
    assert not actual.isnan().any()
    assert_close(actual, expected)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_equal_rewards_in_a_group_give_zero_advantages(scale_rewards) -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    advantages = group_relative_advantages(rewards, group_size=4, scale_rewards=scale_rewards)
    assert torch.equal(advantages, torch.zeros(8))


def test_group_advantages_are_standardised_with_unbiased_std() -> None:
    advantages = group_relative_advantages(torch.tensor([0.0, 1.0, 2.0, 10.0, 20.0, 30.0]), group_size=3)
    # each group has unbiased std 1 and 10 respectively: (-1, 0, 1) / (std + 1e-4)
    assert_close(
        advantages, torch.tensor([-1, 0, 1, -10, 0, 10]) / torch.tensor([1.0001] * 3 + [10.0001] * 3)
    )


def test_group_advantages_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="divisible"):
        group_relative_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_relative_advantages(torch.zeros(4), group_size=2, scale_rewards="prompt")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (8, 33)])
def test_kl_estimators_match_trl(shape) -> None:
    g = torch.Generator().manual_seed(shape[1])
    per_token_logps = -3 * torch.rand(shape, generator=g)
    ref_per_token_logps = per_token_logps + 0.5 * torch.randn(shape, generator=g)

    # TRL 1.16 trl/trainer/grpo_trainer.py GRPOTrainer._compute_loss (k3)
    assert_in_trl_source(
        grpo_trainer.GRPOTrainer._compute_loss,
        "per_token_kl = ( torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1 )",
    )
    grpo_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    assert_close(kl_estimate(per_token_logps, ref_per_token_logps, "k3"), grpo_kl)

    # TRL 1.16 trl/trainer/rloo_trainer.py RLOOTrainer._generate_and_score_completions (k1)
    assert_in_trl_source(
        rloo_trainer.RLOOTrainer._generate_and_score_completions,
        "per_token_kl = old_per_token_logps - ref_per_token_logps",
    )
    rloo_kl = per_token_logps - ref_per_token_logps
    assert_close(kl_estimate(per_token_logps, ref_per_token_logps, "k1"), rloo_kl)

    # PPOTrainer.train step 4 (trl/experimental/ppo/ppo_trainer.py @0062ee10), quoted:
    #     logr = ref_logprobs - logprobs
    #     kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3
    logr = ref_per_token_logps - per_token_logps
    assert_close(kl_estimate(per_token_logps, ref_per_token_logps, "k1"), -logr)
    assert_close(kl_estimate(per_token_logps, ref_per_token_logps, "k3"), (logr.exp() - 1) - logr)


def test_kl_estimates_are_zero_for_identical_policies_and_k3_never_negative() -> None:
    logps = -torch.rand(4, 9)
    assert torch.equal(kl_estimate(logps, logps, "k1"), torch.zeros(4, 9))
    assert torch.equal(kl_estimate(logps, logps, "k3"), torch.zeros(4, 9))
    assert (kl_estimate(logps, logps + torch.randn(4, 9), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logps, logps, "k2")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------- PPO
# Reference functions and lines quoted from huggingface/trl trl/experimental/ppo/ppo_trainer.py @0062ee10.

INVALID_LOGPROB = 1.0


def trl_masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: bool | None = None) -> torch.Tensor:
    """Compute mean of tensor with a masked values."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


def trl_masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Compute variance of tensor with masked values."""
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("The sum of the mask is zero")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten values with masked values."""
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def make_rollout(batch: int, length: int, seed: int) -> SimpleNamespace:
    """Per-token tensors of a PPO rollout, padded after each response as PPOTrainer.train pads them."""
    g = torch.Generator().manual_seed(seed)
    sequence_lengths = torch.randint(0, length, (batch,), generator=g)  # index of the last real token
    sequence_lengths[0] = length - 1  # one response fills the whole window
    response_idxs = torch.arange(length).repeat(batch, 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    padding_mask_p1 = response_idxs > (sequence_lengths + 1).unsqueeze(1)
    logprobs = torch.masked_fill(-3 * torch.rand(batch, length, generator=g), padding_mask, INVALID_LOGPROB)
    return SimpleNamespace(
        sequence_lengths=sequence_lengths,
        padding_mask=padding_mask,
        padding_mask_p1=padding_mask_p1,
        logprobs=logprobs,
        ref_logprobs=torch.masked_fill(
            logprobs + 0.3 * torch.randn(batch, length, generator=g), padding_mask, INVALID_LOGPROB
        ),
        new_logprobs=torch.masked_fill(
            logprobs + 0.3 * torch.randn(batch, length, generator=g), padding_mask, INVALID_LOGPROB
        ),
        values=torch.masked_fill(torch.randn(batch, length, generator=g), padding_mask_p1, 0),
        vpred=torch.masked_fill(torch.randn(batch, length, generator=g), padding_mask_p1, 0),
        scores=2 * torch.randn(batch, generator=g),
        advantages=torch.randn(batch, length, generator=g),
        returns=torch.randn(batch, length, generator=g),
    )


PPO_SHAPES = [(2, 1), (4, 6), (8, 17)]  # (sequences, response tokens)


@pytest.mark.parametrize(("batch", "length"), PPO_SHAPES)
@pytest.mark.parametrize("cliprange", [0.1, 0.2])
def test_ppo_policy_loss_matches_trl(batch, length, cliprange) -> None:
    r = make_rollout(batch, length, seed=batch + length)
    mb_advantage = torch.masked_fill(r.advantages, r.padding_mask, 0)
    # PPOTrainer.train, the PPO epoch loop, quoted:
    logprobs_diff = r.new_logprobs - r.logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, ~r.padding_mask)

    assert_close(
        ppo_policy_loss(r.new_logprobs, r.logprobs, mb_advantage, ~r.padding_mask, cliprange), pg_loss
    )


@pytest.mark.parametrize(("batch", "length"), PPO_SHAPES)
@pytest.mark.parametrize(("epsilon_low", "epsilon_high"), [(0.2, 0.2), (0.2, 0.28)])
def test_ppo_policy_loss_matches_trl_grpo_bnpo(batch, length, epsilon_low, epsilon_high) -> None:
    """TRL 1.16 GRPOTrainer._compute_loss, loss_type="bnpo", token-level ratios, beta=0, sequence advantages."""
    assert_in_trl_source(
        grpo_trainer.GRPOTrainer._compute_loss,
        "coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)",
        "per_token_loss1 = coef_1 * advantages",
        "per_token_loss2 = coef_2 * advantages",
        "per_token_loss = -torch.min(per_token_loss1, per_token_loss2)",
        "loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)",
    )
    r = make_rollout(batch, length, seed=batch * length)
    per_token_logps, old_per_token_logps, mask = r.new_logprobs, r.logprobs, (~r.padding_mask).long()
    advantages = r.scores  # GRPO: one advantage per sequence, shape (B,)

    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)

    actual = ppo_policy_loss(
        per_token_logps, old_per_token_logps, advantages, mask, epsilon_low, epsilon_high
    )
    assert_close(actual, loss)


@pytest.mark.parametrize(("batch", "length"), PPO_SHAPES)
@pytest.mark.parametrize("cliprange_value", [0.05, 0.2])
def test_ppo_value_loss_matches_trl(batch, length, cliprange_value) -> None:
    r = make_rollout(batch, length, seed=3 * batch + length)
    vpred, mb_values, mb_return = r.vpred, r.values, r.returns
    # PPOTrainer.train, the PPO epoch loop, quoted:
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, ~r.padding_mask_p1)

    assert_close(ppo_value_loss(vpred, mb_values, mb_return, ~r.padding_mask_p1, cliprange_value), vf_loss)


@pytest.mark.parametrize(("batch", "length"), [(4, 6), (8, 17), (16, 3)])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9)])
@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_ppo_rewards_gae_and_whitening_match_trl(
    batch, length, gamma, lam, kl_estimator, whiten_rewards
) -> None:
    """PPOTrainer.train steps 4-6 end to end: KL-penalised rewards, optional reward whitening, GAE, advantage
    whitening."""
    r = make_rollout(batch, length, seed=batch * 7 + length)
    kl_coef = 0.05
    padding_mask, padding_mask_p1, values = r.padding_mask, r.padding_mask_p1, r.values
    sequence_lengths_p1 = r.sequence_lengths + 1

    # PPOTrainer.train steps 4-6, quoted (args.* replaced by the parameters):
    logr = r.ref_logprobs - r.logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, r.sequence_lengths)
    rewards[actual_start, actual_end] += r.scores
    if whiten_rewards:
        rewards = trl_masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    lastgaelam = 0
    advantages_reversed = []
    gen_length = length
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    raw_advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = raw_advantages + values
    advantages = trl_masked_whiten(raw_advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)

    # the same pipeline from our functions
    our_rewards = -kl_coef * kl_estimate(r.logprobs, r.ref_logprobs, kl_estimator)
    our_rewards[actual_start, actual_end] += r.scores
    if whiten_rewards:
        our_rewards = whiten(our_rewards, ~padding_mask_p1, shift_mean=False)
    our_raw_advantages, our_returns = gae_advantages(our_rewards, values, ~padding_mask_p1, gamma, lam)
    assert_close(our_raw_advantages, raw_advantages)
    assert_close(our_returns, returns)
    assert_close(whiten(our_raw_advantages, ~padding_mask), advantages)


@pytest.mark.parametrize(("batch", "length"), PPO_SHAPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_trl(batch, length, shift_mean) -> None:
    r = make_rollout(batch, length, seed=11 * batch + length)
    expected = torch.masked_fill(
        trl_masked_whiten(r.advantages, ~r.padding_mask, shift_mean), r.padding_mask, 0
    )
    whitened = whiten(r.advantages, ~r.padding_mask, shift_mean)
    assert_close(whitened, expected)
    if shift_mean:
        kept = whitened[~r.padding_mask]
        assert abs(kept.mean().item()) < 1e-5
        assert abs(kept.std().item() - 1) < 1e-3


def test_masked_losses_ignore_padding_and_survive_an_empty_mask() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, float("inf")]])
    old = torch.tensor([[-1.5, -1.0, 0.0]])
    advantages = torch.tensor([[1.0, -1.0, -1.0]])  # -A * exp(inf) = inf at the padded position
    mask = torch.tensor([[1, 1, 0]])
    loss = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    assert torch.isfinite(loss)
    assert_close(loss, ppo_policy_loss(logprobs[:, :2], old[:, :2], advantages[:, :2], mask[:, :2], 0.2))

    empty = torch.zeros(2, 5)
    assert ppo_policy_loss(torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5), empty, 0.2).item() == 0.0
    assert ppo_value_loss(torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5), empty, 0.2).item() == 0.0
    with pytest.raises(ValueError, match="two"):
        whiten(torch.randn(1, 5), torch.tensor([[1, 0, 0, 0, 0]]))


def test_gae_with_gamma_and_lambda_one_gives_reward_to_go() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(returns, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))
    assert_close(advantages, torch.tensor([[5.5, 6.0, 1.0, 0.0]]))


def test_gae_does_not_bootstrap_from_padding() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 99.0, 99.0]])
    values = torch.tensor([[0.5, -1.0, 2.0, 99.0, -99.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    unpadded_advantages, unpadded_returns = gae_advantages(
        rewards[:, :3], values[:, :3], mask[:, :3], 0.9, 0.8
    )
    assert_close(advantages, F.pad(unpadded_advantages, (0, 2)))
    assert_close(returns, F.pad(unpadded_returns, (0, 2)))


# ---------------------------------------------------------------------------------------------- distillation


@pytest.mark.parametrize(("batch", "length", "vocab"), [(1, 1, 2), (3, 5, 11), (4, 9, 64)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_distillation_kl_matches_trl(batch, length, vocab, temperature, masked) -> None:
    g = torch.Generator().manual_seed(batch * vocab + length)
    student_logits = 3 * torch.randn(batch, length, vocab, generator=g)
    teacher_logits = 3 * torch.randn(batch, length, vocab, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if masked:
        mask[:, : length // 2] = 0  # prompt positions
        mask[-1, -1] = 0
    labels = torch.where(mask.bool(), 0, -100)
    actual = distillation_kl(student_logits, teacher_logits, temperature, mask if masked else None)

    # TRL 1.16 trl/experimental/gkd/gkd_trainer.py GKDTrainer.generalized_jsd_loss (static), called directly;
    # beta=0 is KL(teacher || student); TRL does not multiply by temperature**2
    gkd = gkd_trainer.GKDTrainer.generalized_jsd_loss(
        student_logits, teacher_logits, labels=labels, beta=0.0, temperature=temperature
    )
    assert_close(actual, temperature**2 * gkd)

    # TRL 1.16 trl/trainer/distillation_trainer.py _chunked_divergence_loss, called directly: an identity lm_head
    # turns the "hidden states" into the logits
    identity = torch.eye(vocab)
    chunked, _, _ = distillation_trainer._chunked_divergence_loss(
        student_logits, teacher_logits, identity, identity, mask, beta=0.0, temperature=temperature
    )
    assert_close(actual, temperature**2 * chunked)


def test_distillation_kl_is_zero_for_a_perfect_student_and_masks_positions() -> None:
    logits = torch.randn(2, 4, 8)
    assert distillation_kl(logits, logits.clone(), temperature=2.0).abs().item() < 1e-6
    student = logits.clone()
    student[:, 0] = -student[:, 0]  # wrong only where masked out
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])
    assert distillation_kl(student, logits, 2.0, mask).abs().item() < 1e-6
    assert distillation_kl(student, logits, 2.0).item() > 1e-2
