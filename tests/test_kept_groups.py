"""Kept groups (hivemind_ext/kept_groups.py): the next round of the same peers forms without matchmaking, and any
change sends every member back to matchmaking. Real hivemind averagers on a loopback DHT in this process."""

from __future__ import annotations

import time

import pytest
import torch

from potluck.hivemind_ext.ctrl_c import KeepsCtrlC
from potluck.hivemind_ext.followers import PatientFollowers
from potluck.hivemind_ext.kept_groups import KEEP, KeptGroups
from potluck.hivemind_ext.rounds import CheckedRounds, round_bits
from tests.helpers import all_averaged, loopback_averagers, outcomes_of

MATCHMAKING_TIME = 1.0
KEPT_GROUP_WAIT = 3.0


class _Kept(PatientFollowers, KeptGroups, CheckedRounds, KeepsCtrlC):
    pass


def _round(averagers, step: int, keep: list[bool]) -> list:
    """Round ``step`` of ``averagers``, each asking to keep its last group or not; their outcomes (the gathered
    mapping, or the exception). Each averages its index + 1, so a round of everyone averages to the mean."""
    for index, averager in enumerate(averagers):
        averager.set_group_bits(round_bits(step))
        with averager.get_tensors() as (tensor,):
            tensor.fill_(float(index + 1))
    controls = [
        averager.step(
            gather={"outer_step": step, KEEP: asks},
            timeout=(KEPT_GROUP_WAIT if asks else 0.0) + 4 * MATCHMAKING_TIME,
            allow_retries=False,
            wait=False,
        )
        for averager, asks in zip(averagers, keep, strict=True)
    ]
    return outcomes_of(controls, 60)


def _averaged(averager) -> float:
    with averager.get_tensors() as (tensor,):
        assert torch.all(tensor == tensor[0]), "one value expected"
        return tensor[0].item()


@pytest.mark.timeout(240)
def test_a_kept_group_reforms_without_matchmaking_and_any_change_goes_back_to_it():
    with loopback_averagers(
        [(_Kept, 0.0)] * 3,
        size=1000,
        prefix="kept-test",
        min_matchmaking_time=MATCHMAKING_TIME,
        kept_group_wait=KEPT_GROUP_WAIT,
    ) as averagers:
        # round 0: nothing to keep, so matchmaking (which takes at least its matchmaking time). It only sets up the
        # group the next round keeps; on a loaded machine its matchmaking may close without a member (a fresh-clone
        # suite: round 0 not fully averaged), so it is tried up to 3 times (a round of the same step keeps nothing)
        for _ in range(3):
            outcomes = _round(averagers, 0, [True] * 3)
            if all_averaged(outcomes, 3):
                break
        assert all_averaged(outcomes, 3), outcomes
        assert [a.kept_rounds for a in averagers] == [0, 0, 0]

        # round 1: every member asks to keep the group: formed by the check-ins, well within a matchmaking time
        started = time.monotonic()
        outcomes = _round(averagers, 1, [True] * 3)
        kept_seconds = time.monotonic() - started
        assert all_averaged(outcomes, 3), outcomes
        assert [a.kept_rounds for a in averagers] == [1, 1, 1]
        assert [_averaged(a) for a in averagers] == [2.0, 2.0, 2.0]
        assert kept_seconds < MATCHMAKING_TIME, kept_seconds

        # round 2: one member sees a change (a newcomer, a failed round): every member searches, none waits
        started = time.monotonic()
        outcomes = _round(averagers, 2, [True, False, True])
        assert time.monotonic() - started < KEPT_GROUP_WAIT + 4 * MATCHMAKING_TIME
        assert all_averaged(outcomes, 3), outcomes
        assert [a.kept_rounds for a in averagers] == [1, 1, 1]

        # round 4 after 3: a round that skips a step (a peer back from a download) keeps nothing
        outcomes = _round(averagers, 4, [True] * 3)
        assert all_averaged(outcomes, 3), outcomes
        assert [a.kept_rounds for a in averagers] == [1, 1, 1]
        outcomes = _round(averagers, 5, [True] * 3)
        assert [a.kept_rounds for a in averagers] == [2, 2, 2]

        # round 6: a member is gone (whether it was the keeper or not): the others search once it did not come
        averagers[-1].shutdown()
        outcomes = _round(averagers[:2], 6, [True, True])
        assert all_averaged(outcomes, 2), outcomes
        assert [a.kept_rounds for a in averagers[:2]] == [2, 2]
        assert [_averaged(a) for a in averagers[:2]] == [1.5, 1.5]
        # and the two of them keep their new group
        outcomes = _round(averagers[:2], 7, [True, True])
        assert all_averaged(outcomes, 2), outcomes
        assert [a.kept_rounds for a in averagers[:2]] == [3, 3]
