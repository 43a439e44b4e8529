"""The robust rules a reducer may combine a chunk with (hivemind_ext/aggregators.py): what one malicious sender
can and cannot do to each, on plain tensors (the reducer itself: tests/test_rounds.py)."""

from __future__ import annotations

import pytest
import torch

from potluck.hivemind_ext.aggregators import ROBUST, Aggregator

pytestmark = pytest.mark.unit


def honest(n: int, size: int = 1000) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return [1.0 + 0.1 * torch.randn(size, generator=generator) for _ in range(n)]


@pytest.mark.parametrize("n_honest", [2, 3])
@pytest.mark.parametrize("kind", ROBUST)
def test_one_sign_flipping_sender_among_three_or_four_cannot_turn_the_average_around(kind, n_honest):
    """With 2 honest senders and the attacker (a group of 3: the trimmed mean must trim one value each side,
    or it is the plain mean, attacker included) and with 3 honest ones; weights claimed at 1000x count for
    nothing."""
    parts = honest(n_honest)
    attacker = -10 * torch.stack(parts).mean(dim=0)
    result = Aggregator(kind).combine([*parts, attacker], [1.0] * n_honest + [1000.0])
    plain = Aggregator().combine([*parts, attacker], [1.0] * n_honest + [1000.0])
    assert plain.mean() < -9  # the weighted mean goes where the attacker says
    assert 0.7 < result.mean() < 1.3, result.mean()


@pytest.mark.parametrize(
    ("kind", "trim", "attackers", "group"),
    [("mean", 0.25, 1, 2), ("median", 0.25, 1, 3), ("trimmed_mean", 0.25, 1, 3), ("centered_clip", 0.25, 1, 3),
     ("median", 0.25, 3, 7), ("centered_clip", 0.25, 3, 7), ("trimmed_mean", 0.375, 3, 8),
     ("trimmed_mean", 0.25, 3, 12), ("trimmed_mean", 0.25, 2, 8)],
)  # fmt: skip
def test_the_smallest_group_that_averages_outvotes_the_attackers_it_assumes(kind, trim, attackers, group):
    rule = Aggregator(kind, trim=trim, attackers=attackers)
    assert rule.min_group_size == group
    if not rule.robust:
        return
    # that many attackers, all in the smallest group, flipping their sign x10: the result stays with the honest
    parts = honest(group - attackers)
    flipped = [-10 * torch.stack(parts).mean(dim=0)] * attackers
    result = rule.combine([*parts, *flipped], [1.0] * group)
    assert 0.7 < result.mean() < 1.3, result.mean()
    # one peer fewer, and nothing holds them (which is why such a group does not average)
    fewer = rule.combine([*parts[1:], *flipped], [1.0] * (group - 1))
    assert fewer.mean() < 0.7, fewer.mean()


def test_a_chunk_far_past_the_groups_norm_is_named_and_weight_zero_parts_never_vote():
    parts = [*honest(3), torch.full((1000,), 1e3)]
    rule = Aggregator("median")
    assert rule.outliers(parts, [1.0, 1.0, 1.0, 1.0]) == [3]
    assert rule.outliers(parts, [1.0, 1.0, 1.0, 0.0]) == []  # a weight-0 part is no voter to name
    stale = torch.full((1000,), 50.0)  # a peer that joined with nothing to add still sends its old tensor
    assert 0.9 < rule.combine([*honest(3), stale], [1.0, 1.0, 1.0, 0.0]).mean() < 1.1
    assert Aggregator().outliers(parts, [1.0] * 4) == []  # the mean names nobody (as before)


def test_the_median_of_an_even_count_is_the_mean_of_the_middle_two_and_every_rule_is_deterministic():
    parts = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([-1000.0])]
    assert Aggregator("median").combine(parts, [1.0] * 4).item() == 1.5
    assert Aggregator("trimmed_mean").combine(parts, [1.0] * 4).item() == 1.5
    for kind in ROBUST:  # every peer of a group decodes the reducer's one result: same inputs, same bits
        first, second = (Aggregator(kind).combine(honest(4), [1.0] * 4) for _ in range(2))
        assert torch.equal(first, second)


def test_centered_clip_moves_at_most_its_radius_per_sender_and_iteration():
    parts = [torch.zeros(100)] * 3 + [torch.full((100,), 1e6)]
    result = Aggregator("centered_clip", clip_radius=1.0, iterations=10).combine(parts, [1.0] * 4)
    assert result.norm() <= 10 * 1.0 / 4 + 1e-4


def test_under_the_mean_a_claimed_weight_counts_for_at_most_weight_cap_times_the_others_median():
    rule = Aggregator("mean", weight_cap=4.0)
    assert rule.capped([64.0, 60.0, 64_000.0, 0.0]) == ([64.0, 60.0, 4 * 62.0, 0.0], [2])
    assert rule.capped([64.0, 64_000.0]) == ([64.0, 256.0], [1])  # a pair: against the other one
    assert rule.capped([64.0, 200.0, 70.0]) == (
        [64.0, 200.0, 70.0],
        [],
    )  # a faster honest peer, within the cap
    assert rule.capped([5.0]) == ([5.0], [])  # alone: nothing to compare with
    assert Aggregator("mean", weight_cap=None).capped([1.0, 1e6]) == ([1.0, 1e6], [])
    assert Aggregator("median").capped([1.0, 1e6]) == (
        [1.0, 1e6],
        [],
    )  # robust rules ignore the weights anyway
    parts = [torch.ones(3), torch.full((3,), -1000.0)]
    torch.testing.assert_close(rule.combine(parts, rule.capped([1.0, 1000.0])[0]), torch.full((3,), -799.8))


@pytest.mark.parametrize("weight_cap", [4.0, None])
def test_under_the_mean_a_zero_weight_takes_the_others_and_all_zero_weights_count_one_each(weight_cap):
    # span replicas weigh in with the steps they took since their last round: an idle one claims 0
    rule = Aggregator("mean", weight_cap=weight_cap)
    trained, idle = torch.tensor([0.3, -0.7]), torch.zeros(2)
    assert torch.equal(rule.combine([trained, idle], rule.capped([8.0, 0.0])[0]), trained)
    # all idle: the plain mean (0 / 0 before: NaN in every replica's adapter)
    torch.testing.assert_close(rule.combine([trained, idle], rule.capped([0.0, 0.0])[0]), trained / 2)
