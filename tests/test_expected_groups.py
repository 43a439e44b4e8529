"""Expected groups (hivemind_ext/expected_groups.py): peers that begin their search further apart than the matchmaking
time still meet in one group when the window covers the spread, and a search that says how many peers it expects
does not wait out that window once they are all in. Real hivemind averagers on a loopback DHT in this process."""

from __future__ import annotations

import time

import pytest
from hivemind.utils.timed_storage import get_dht_time

from potluck.hivemind_ext.ctrl_c import KeepsCtrlC
from potluck.hivemind_ext.expected_groups import EXPECT, ExpectedGroups
from potluck.hivemind_ext.followers import PatientFollowers
from potluck.hivemind_ext.rounds import CheckedRounds, round_bits
from tests.helpers import all_averaged, loopback_averagers, outcomes_of

MATCHMAKING_TIME = 0.5
LATE = 1.0
"""How long after the first the others begin their search: twice the matchmaking time (DiLoCo's peers see the last
one's "ready" up to a poll apart, and a busy machine adds to it)."""
WINDOW = 5.0
"""The window each declares (``scheduled_time``): covers ``LATE`` with room for a loaded machine."""


class _Expected(PatientFollowers, ExpectedGroups, CheckedRounds, KeepsCtrlC):
    pass


def _staggered_round(averagers, step: int, expect: bool) -> tuple[list, float]:
    """Round ``step``: the first averager searches, the others ``LATE`` seconds later, each declaring a window of
    ``WINDOW`` seconds and, if ``expect``, expecting all of them. Their outcomes and the seconds from the first
    search to the last outcome."""
    gather = {"outer_step": step, **({EXPECT: len(averagers)} if expect else {})}
    for averager in averagers:
        averager.set_group_bits(round_bits(step))
    started = time.monotonic()
    controls = []
    for index, averager in enumerate(averagers):
        if index == 1:
            time.sleep(LATE)  # the scenario itself: the others begin late
        controls.append(
            averager.step(
                gather=gather,
                scheduled_time=get_dht_time() + WINDOW,
                timeout=WINDOW + 4 * MATCHMAKING_TIME,
                allow_retries=False,
                wait=False,
            )
        )
    outcomes = outcomes_of(controls, 60)
    return outcomes, time.monotonic() - started


@pytest.mark.timeout(180)
def test_late_searchers_meet_in_the_window_and_an_expected_group_does_not_wait_it_out():
    with loopback_averagers(
        [(_Expected, 0.0)] * 3,
        size=1000,
        prefix="expected-test",
        min_matchmaking_time=MATCHMAKING_TIME,
    ) as averagers:
        # expecting all three: one group, formed once the late ones joined, well before the window ends
        outcomes, seconds = _staggered_round(averagers, 0, expect=True)
        assert all_averaged(outcomes, 3), outcomes
        assert seconds < WINDOW, seconds

        # expecting nobody in particular: one group too, but the leader holds it open to the end of its window
        outcomes, seconds = _staggered_round(averagers, 1, expect=False)
        assert all_averaged(outcomes, 3), outcomes
        assert seconds >= WINDOW - 0.1, seconds
