"""Averaging rounds (hivemind_ext/rounds.py): a round says when part of the average never arrived. Real hivemind
averagers on a loopback DHT in this process."""

from __future__ import annotations

import asyncio
import math
import time
from typing import AsyncIterator  # noqa: UP035 (hivemind reads the stream type from typing's alias only)

import pytest
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

from potluck.hivemind_ext.aggregators import Aggregator
from potluck.hivemind_ext.allreduce import SameAverages, aggregate_with, capped_weights, refused_parts
from potluck.hivemind_ext.ctrl_c import KeepsCtrlC
from potluck.hivemind_ext.rounds import (
    PARTIAL,
    CheckedRounds,
    gradient_round_data,
    group_of,
    public_step,
    received_fraction,
    step_of,
    steps_gathered,
)
from tests.helpers import loopback_averagers

SIZE = 300_000
"""Elements averaged: several of hivemind's parts, so that each peer reduces some (a tiny tensor is one
part, reduced by one peer only)."""


class _Averager(CheckedRounds, KeepsCtrlC):
    pass


class _SameStep(CheckedRounds, KeepsCtrlC):
    step_spread = 0


class _DeadReducer(_Averager):
    """Takes part in matchmaking, then fails every part sent to it for reducing (a peer that died
    mid-round, or whose link dropped)."""

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        raise RuntimeError("this reducer died mid-round")
        yield  # an async generator, as hivemind's handler is


_DeadReducer.__name__ = _Averager.__name__  # hivemind names its RPC handlers after the averager's class


def _averagers(*classes_and_values, **options):
    return loopback_averagers(classes_and_values, size=SIZE, prefix="rounds-test", **options)


def _outcome(control, timeout: float = 30.0):
    try:
        return control.result(timeout=timeout)
    except Exception as e:  # a round that found nobody, or failed
        return e


def _tensor(averager) -> torch.Tensor:
    with averager.get_tensors() as (tensor,):
        return tensor.clone()


@pytest.mark.timeout(120)
def test_a_round_that_lost_part_of_the_average_says_so():
    with _averagers((_Averager, 1.0), (_DeadReducer, 3.0)) as (healthy, broken):
        rounds = [averager.step(timeout=15.0, wait=False) for averager in (healthy, broken)]
        gathered, _ = [_outcome(control) for control in rounds]
        # hivemind returns the round as done (here with none of the average: the dead peer also never
        # sent its part to be reduced); what did not arrive kept this peer's own values
        assert isinstance(gathered, dict), gathered
        arrived = received_fraction(gathered)
        assert arrived < 1.0
        tensor = _tensor(healthy)
        averaged = torch.isclose(tensor, torch.tensor(2.0))
        assert torch.equal(tensor[~averaged], torch.full_like(tensor[~averaged], 1.0))
        assert averaged.float().mean().item() == pytest.approx(arrived)


class _SilentClient(_Averager):
    """Joins a group (a client: it reduces nothing), then never sends its parts: a peer that had given up on the
    round when its leader's go arrived, on a busy machine."""

    async def _aggregate_with_group(self, group_info, *args, **kwargs):
        await asyncio.Future()  # silent until its round is cancelled (its allreduce_timeout, or the shutdown)


_SilentClient.__name__ = _Averager.__name__


@pytest.mark.timeout(120)
def test_a_round_whose_reducer_missed_a_senders_parts_says_so():
    """The leader reduced every part alone and took its own values for the group's average, counted as a round of
    2 (tests/test_diloco.py's client-mode pair, on a busy machine): what it reduced lacked the client's parts."""
    with loopback_averagers(
        [(_Averager, 1.0), (_SilentClient, 3.0)], size=SIZE, prefix="rounds-test", clients=[1]
    ) as (server, client):
        rounds = [averager.step(timeout=15.0, wait=False) for averager in (server, client)]
        gathered = _outcome(rounds[0])
        assert isinstance(gathered, dict) and len(group_of(gathered)) == 2, gathered
        assert received_fraction(gathered) == pytest.approx(0.5)
        assert torch.equal(_tensor(server), torch.full((SIZE,), 1.0))  # its own: nothing of the client's came


@pytest.mark.timeout(120)
def test_a_same_step_round_averages_only_peers_at_one_step():
    with _averagers((_SameStep, 1.0), (_SameStep, 3.0)) as averagers:
        # a round of step 11 meeting one of step 12 (the state rounds on a loaded machine): not averaged
        rounds = [
            a.step(gather=step, timeout=15.0, wait=False) for a, step in zip(averagers, (11, 12), strict=True)
        ]
        outcomes = [_outcome(control) for control in rounds]
        for outcome in outcomes:
            assert isinstance(outcome, dict), outcome
            assert sorted(group_of(outcome).values()) == [11, 12]  # the caller still sees the other's step
        assert [_tensor(a)[0].item() for a in averagers] == [1.0, 3.0]
        assert all(
            torch.equal(_tensor(a), torch.full((SIZE,), v))
            for a, v in zip(averagers, (1.0, 3.0), strict=True)
        )

        rounds = [a.step(gather=12, timeout=15.0, wait=False) for a in averagers]
        outcomes = [_outcome(control) for control in rounds]
        assert all(isinstance(outcome, dict) and len(group_of(outcome)) == 2 for outcome in outcomes), (
            outcomes
        )
        assert all(torch.allclose(_tensor(a), torch.full((SIZE,), 2.0)) for a in averagers)


class _GradientRounds(CheckedRounds, KeepsCtrlC):
    step_spread = 1
    skipped_is_partial = True


@pytest.mark.timeout(120)
def test_a_gradient_round_averages_peers_at_most_a_step_apart():
    """hivemind lets a peer that has just missed the others' step join their next round; a NAT peer also averaged
    with a healed peer five steps behind it, and counted that as stepping with the swarm (tests/test_faults.py)."""
    with _averagers((_GradientRounds, 1.0), (_GradientRounds, 3.0)) as averagers:
        rounds = [
            a.step(gather=gradient_round_data(step, client_mode=False), timeout=15.0, wait=False)
            for a, step in zip(averagers, (10, 12), strict=True)
        ]
        for outcome in (_outcome(control) for control in rounds):
            assert isinstance(outcome, dict) and received_fraction(outcome) == 0.0, outcome  # a failed round
            assert steps_gathered(outcome) == {10, 12}
        assert [_tensor(a)[0].item() for a in averagers] == [1.0, 3.0]

        rounds = [
            a.step(gather=gradient_round_data(step, client_mode=False), timeout=15.0, wait=False)
            for a, step in zip(averagers, (11, 12), strict=True)
        ]
        for outcome in (_outcome(control) for control in rounds):
            assert isinstance(outcome, dict) and received_fraction(outcome) == 1.0, outcome
        assert all(torch.allclose(_tensor(a), torch.full((SIZE,), 2.0)) for a in averagers)


def test_the_swarms_step_in_a_gradient_round_is_its_public_peers():
    gathered = {
        "public": gradient_round_data(7, client_mode=False),
        "nat": gradient_round_data(9, client_mode=True),
        PARTIAL: 1.0,
    }
    assert public_step(gathered) == 7 and steps_gathered(gathered) == {7, 9}
    assert public_step({"nat": gradient_round_data(9, client_mode=True)}) is None
    assert step_of(12) == 12 and step_of(True) is None and step_of({"outer_step": 3}) is None


class _Exact(CheckedRounds, SameAverages, KeepsCtrlC):
    pass


@pytest.mark.timeout(120)
@pytest.mark.parametrize("averager, same", [(_Averager, False), (_Exact, True)])
def test_every_peer_of_a_round_holds_the_same_average_to_the_bit(averager, same):
    """hivemind hands each peer ``average - its part`` in float32, which each adds to its own part: that
    misses the average by an ulp in about one value in two thousand, differently on every peer, so peers
    that averaged together still ended apart. With ``SameAverages`` they hold the same bits."""
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(SIZE, generator=generator) * scale for scale in (1e-3, 1.0, 1e3)]
    with _averagers(*((averager, value) for value in values)) as averagers:
        rounds = [a.step(timeout=30.0, wait=False) for a in averagers]
        assert all(isinstance(_outcome(control), dict) for control in rounds)
        first, *others = (_tensor(a) for a in averagers)
    torch.testing.assert_close(first, sum(values) / 3)
    assert all(torch.equal(first, other) for other in others) is same


@pytest.mark.timeout(120)
def test_a_peer_sending_nan_is_refused_and_the_others_average_without_it():
    """One NaN in one sender's part made every peer's average NaN (issue 17). Reducers refuse the part and
    average without its sender; a peer refuses a NaN average from the NaN peer's own reducer and keeps its
    own values there; the round says that part of the average did not arrive."""
    refused_before = refused_parts()
    with _averagers((_Exact, 1.0), (_Exact, 3.0), (_Exact, math.nan)) as averagers:
        rounds = [a.step(timeout=30.0, wait=False) for a in averagers]
        honest = [_outcome(control) for control in rounds[:2]]
        tensors = [_tensor(a) for a in averagers[:2]]
    assert all(isinstance(gathered, dict) and len(group_of(gathered)) == 3 for gathered in honest), honest
    for gathered, tensor, own in zip(honest, tensors, (1.0, 3.0), strict=True):
        assert torch.isfinite(tensor).all()
        averaged = tensor == 2.0  # the honest peers' mean, where an honest peer reduced the part
        assert torch.equal(tensor[~averaged], torch.full_like(tensor[~averaged], own))
        share = averaged.float().mean().item()
        # (the round says at most that share: the NaN sender's parts are missing from what it reduced, too)
        assert 0 < share < 1 and 0 < received_fraction(gathered) <= share + 1e-6
    assert torch.equal(tensors[0] == 2.0, tensors[1] == 2.0)  # the same parts, averaged the same
    assert refused_parts() - refused_before >= 2 + 2  # each honest reducer refused the NaN part; each
    # honest peer refused the NaN reducer's average


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["uncapped mean", "mean", "median"])
def test_a_robust_rule_keeps_a_sign_flipping_peer_with_a_huge_weight_from_the_average(kind):
    """Issue 17: one peer sends its values sign-flipped at 1000x and claims 1000x the samples. hivemind's mean
    goes wherever it says; the mean counts its weight for at most 4 honest peers' (``weight_cap``), so it moves
    the average less but still far; with a robust rule the reducers leave its part out (its norm is far past
    the group's) and take the median of the rest, whatever weight it claims, and count the refusal."""
    refused_before, capped_before = refused_parts(), capped_weights()
    aggregate_with(Aggregator("mean", weight_cap=None) if kind == "uncapped mean" else Aggregator(kind))
    try:
        with _averagers((_Exact, 1.0), (_Exact, 2.0), (_Exact, 3.0), (_Exact, -1000.0)) as averagers:
            weights = (1.0, 1.0, 1.0, 1000.0)
            rounds = [
                a.step(weight=w, timeout=30.0, wait=False) for a, w in zip(averagers, weights, strict=True)
            ]
            outcomes = [_outcome(control) for control in rounds]
            tensors = [_tensor(a) for a in averagers[:3]]
    finally:
        aggregate_with(Aggregator())
    assert all(isinstance(o, dict) and len(group_of(o)) == 4 for o in outcomes), outcomes
    expected = {
        "median": 2.0,
        "mean": (1.0 + 2.0 + 3.0 - 4 * 1000.0) / 7,  # its weight counted as 4x the others' median, 1
        "uncapped mean": (1.0 + 2.0 + 3.0 - 1000.0 * 1000.0) / 1003.0,
    }[kind]
    for tensor in tensors:
        torch.testing.assert_close(tensor, torch.full_like(tensor, expected))
    refused = refused_parts() - refused_before
    assert refused >= 2 if kind == "median" else refused == 0  # each reducer left the flipped part out
    capped = capped_weights() - capped_before
    assert 1 <= capped <= 4 if kind == "mean" else capped == 0  # once in the round by each reducer of a part


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("rule", "values"),
    [
        (Aggregator("median"), (1.0, -1000.0)),
        (Aggregator("median", attackers=2), (1.0, 2.0, -1000.0, -1000.0)),
    ],
    ids=["one attacker, a pair", "two attackers, a group of 4"],
)
def test_under_a_robust_rule_a_group_too_small_to_outvote_the_attackers_does_not_average(rule, values):
    """One honest and one malicious peer: no rule can tell which is which, so neither averages (the round
    says none of the average arrived) and each keeps its own values; likewise 4 peers where the run assumes 2
    attackers (the median of 1, 2 and two attackers' -1000 would be -499.5)."""
    aggregate_with(rule)
    try:
        with _averagers(*((_Exact, v) for v in values)) as averagers:
            outcomes = [_outcome(c) for c in [a.step(timeout=30.0, wait=False) for a in averagers]]
            tensors = [_tensor(a) for a in averagers]
    finally:
        aggregate_with(Aggregator())
    assert all(isinstance(o, dict) and received_fraction(o) == 0.0 for o in outcomes), outcomes
    assert [t.unique().tolist() for t in tensors] == [[v] for v in values]


@pytest.mark.timeout(120)
def test_under_a_robust_rule_two_early_peers_wait_for_a_third_instead_of_pairing():
    """Two peers ready together and a third past their matchmaking time: under a robust rule (whose groups of 2
    do not average) the early two do not assemble a pair at the end of matchmaking but wait, and all three
    average as one group; the median of 1, 2 and 3 reaches each of them. (With hivemind's minimum of 2 the
    early two paired, averaged nothing, and the third found no group.)"""
    rule = Aggregator("median")
    aggregate_with(rule)
    try:
        values = ((_Averager, 1.0), (_Averager, 2.0), (_Averager, 3.0))
        with _averagers(*values, min_group_size=rule.min_group_size) as averagers:
            early = [a.step(timeout=20.0, wait=False) for a in averagers[:2]]
            time.sleep(2.5)  # the early two's matchmaking (1 s) ends twice before the third looks for a group
            late = averagers[2].step(timeout=20.0, wait=False)
            outcomes = [_outcome(c) for c in (*early, late)]
            tensors = [_tensor(a) for a in averagers]
    finally:
        aggregate_with(Aggregator())
    assert all(isinstance(o, dict) and len(group_of(o)) == 3 for o in outcomes), outcomes
    assert all(received_fraction(o) == 1.0 for o in outcomes), outcomes
    assert all(torch.equal(t, torch.full_like(t, 2.0)) for t in tensors)
