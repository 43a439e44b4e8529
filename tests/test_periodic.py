"""Background duties (reports, collection, route keeping, span averaging) survive a failing tick and stop
when asked."""

from __future__ import annotations

import threading

import pytest

from potluck.runtime.periodic import Periodic
from tests.helpers import wait_until

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def test_a_failing_tick_does_not_end_the_duty():
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(len(ticks))
        if len(ticks) % 2:
            raise RuntimeError("a DHT hiccup")

    duty = Periodic(tick, interval=0.01, name="test-duty").start()
    try:
        wait_until(lambda: len(ticks) >= 5, 10, "five ticks, every other one failing")
    finally:
        duty.stop()
    assert not duty._thread.is_alive()


def test_stop_ends_the_loop_before_the_next_tick():
    ran = threading.Event()
    duty = Periodic(ran.set, interval=60, name="test-duty").start()
    duty.stop(grace=5)
    assert not duty._thread.is_alive()
    assert not ran.is_set()  # the first tick was an interval away


def test_immediately_runs_the_first_tick_at_start():
    ran = threading.Event()
    duty = Periodic(ran.set, interval=60, name="test-duty", immediately=True).start()
    try:
        assert ran.wait(10)
    finally:
        duty.stop()


def test_aligned_ticks_fall_on_multiples_of_the_interval_of_the_shared_clock():
    clock = iter([12.5, 15.0, 29.9])
    duty = Periodic(lambda: None, interval=5, name="aligned", aligned_to=lambda: next(clock))
    assert [duty._until_next_tick() for _ in range(3)] == pytest.approx([2.5, 5.0, 0.1])
