"""A peer says when the averaging deadline does not fit its model (hivemind #676: deadlines users guess)."""

from __future__ import annotations

import logging

import pytest

from potluck.peer.averaging.deadlines import DeadlineWatch, check_deadline_fits, round_seconds_at

pytestmark = pytest.mark.unit


def test_a_round_moves_twice_the_non_local_share_of_the_tensors():
    # 3 peers, 30 MB each: 2/3 of it sent to be reduced, as much of the result received, at 1 MB/s
    assert round_seconds_at(30_000_000, 3, 1e6) == 40.0
    assert round_seconds_at(30_000_000, 1, 1e6) == 0.0  # alone: nothing moves


def test_the_default_deadline_fits_the_tiny_model_and_says_what_a_large_one_needs():
    assert check_deadline_fits(wire_bytes=4 * 2_000_000, averaging_timeout=30.0) is None
    # 1B fp32 parameters over a 20 Mbit/s uplink: about 36 minutes per round
    message = check_deadline_fits(wire_bytes=4 * 1_000_000_000, averaging_timeout=30.0)
    assert message is not None and "averaging.averaging_timeout" in message
    suggested = float(message.split("averaging.averaging_timeout to ")[1].split()[0])
    assert suggested >= 3 * round_seconds_at(4 * 1_000_000_000, 3, 20e6 / 8) - 1


def test_rounds_that_use_a_third_of_their_deadline_draw_one_warning(caplog):
    watch = DeadlineWatch(deadline=30.0)
    assert all(watch.observe(2.0) is None for _ in range(10))  # fast rounds: silent
    watch = DeadlineWatch(deadline=30.0)
    with caplog.at_level(logging.WARNING):
        said = [watch.observe(seconds) for seconds in (12.0, 14.0, 15.0, 13.0)]
    assert said[:2] == [None, None]  # too few rounds to judge
    assert said[2] is not None and "set averaging.averaging_timeout to 42" in said[2]
    assert said[3] is None  # said once, not every round
    assert sum("averaging rounds take" in r.message for r in caplog.records) == 1
