"""A follower waits for its leader's group as long as the leader's all-reduce would wait for it
(hivemind_ext/followers.py). Real hivemind averagers on a loopback DHT in this process; the leader is made late
on purpose: it assembles its group ``LEADER_DELAY`` after its matchmaking time, as a busy leader did on a loaded
machine, beyond the follower's ``request_timeout`` and within its sender timeout."""

from __future__ import annotations

import asyncio

import pytest

from potluck.hivemind_ext.ctrl_c import KeepsCtrlC
from potluck.hivemind_ext.followers import PatientFollowers
from potluck.hivemind_ext.rounds import CheckedRounds, group_of, received_fraction
from tests.helpers import loopback_averagers, outcomes_of

REQUEST_TIMEOUT, LEADER_DELAY, SENDER_TIMEOUT = 0.25, 2.0, 5.0


class _LateLeader(CheckedRounds):
    """Assembles its group ``LEADER_DELAY`` late, whichever of the two ends up leading."""

    async def _step(self, *, step, future_for_init):
        matchmaking = self._matchmaking
        if not getattr(matchmaking, "late", False):
            assemble = matchmaking.leader_assemble_group

            async def late_assembly():
                # the fault under test is this fixed lateness (a busy leader), not a wait for a condition
                await asyncio.sleep(LEADER_DELAY)
                return await assemble()

            matchmaking.leader_assemble_group = late_assembly
            matchmaking.late = True
        return await super()._step(step=step, future_for_init=future_for_init)


class _Patient(PatientFollowers, _LateLeader, KeepsCtrlC):
    pass


class _Upstream(_LateLeader, KeepsCtrlC):
    """hivemind's follower: waits ``REQUEST_TIMEOUT`` past its expiration."""


def _rounds(cls, count: int) -> list:
    """``count`` rounds of two averagers of ``cls`` holding 1 and 3; each round's outcomes (gathered data or the
    exception) and what each then held."""
    results = []
    with loopback_averagers(
        [(cls, 1.0), (cls, 3.0)],
        size=1000,
        prefix=f"followers-{cls.__name__}",
        min_matchmaking_time=1.0,
        request_timeout=REQUEST_TIMEOUT,
        next_chunk_timeout=SENDER_TIMEOUT,
    ) as averagers:
        for _ in range(count):
            for averager, value in zip(averagers, (1.0, 3.0), strict=True):
                with averager.get_tensors() as (tensor,):
                    tensor.fill_(value)
            outcomes = outcomes_of(
                [a.step(timeout=10, allow_retries=False, wait=False) for a in averagers], 60
            )
            held = []
            for averager in averagers:
                with averager.get_tensors() as (tensor,):
                    held.append(tensor.mean().item())
            results.append((outcomes, held))
    return results


def _complete(outcomes) -> bool:
    return all(
        isinstance(o, dict) and len(group_of(o)) == 2 and received_fraction(o) == 1.0 for o in outcomes
    )


@pytest.mark.timeout(240)
def test_a_follower_waits_out_a_late_leader_and_both_average():
    for outcomes, held in _rounds(_Patient, 2):
        assert _complete(outcomes), outcomes
        assert held == [2.0, 2.0], held


@pytest.mark.timeout(240)
def test_with_hivemind_s_wait_the_late_leader_runs_its_round_without_the_follower():
    """The control: what the swarm met before (a partial round for the leader, no group for the follower)."""
    ((outcomes, held),) = _rounds(_Upstream, 1)
    assert not _complete(outcomes), outcomes
    assert held != [2.0, 2.0], held
