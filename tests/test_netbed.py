"""The network test bed does what it is asked: delay, rate, loss, partitions, NAT, and a clean teardown.

Tolerances are wide where the machine's load adds to what was asked (the link emulator is a Python
process sharing 2 cores); lower bounds on delay and upper bounds on rate hold under any load.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from tests.netbed import Link, NetBed
from tests.netbed.fixture import cached_unavailable_reason
from tests.netbed.measure import ping_times, reachable, tcp_mbit, tcp_transfer, udp_loss

pytestmark = pytest.mark.netns


def test_round_trip_time_is_the_sum_of_both_links_delays(netbed):
    a = netbed.add_host("a", Link(delay_ms=15, jitter_ms=3))
    b = netbed.add_host("b", Link(delay_ms=5))
    times = ping_times(a, b)
    assert len(times) >= 18, times  # no loss was asked for
    asked = 2 * (15 + 5)
    assert min(times) >= asked - 2 * 3 - 1  # never faster than the delay minus the jitter
    assert statistics.median(times) <= asked * 1.5 + 10, times  # what the emulator adds, loaded


def test_rate_is_shaped_in_both_directions(netbed):
    a = netbed.add_host("a", Link(rate_mbit=20, delay_ms=2))
    b = netbed.add_host("b", Link(delay_ms=2))
    for source, target in ((a, b), (b, a)):  # a's upload, then a's download
        mbit = tcp_mbit(source, target, 3_000_000)
        assert 0.5 * 20 <= mbit <= 1.1 * 20, f"{source.name}→{target.name}: {mbit:.1f} Mbit/s"


def test_loss_is_what_was_asked_in_each_direction(netbed):
    a = netbed.add_host("a", Link(loss=0.05))
    b = netbed.add_host("b")
    for source, target in ((a, b), (b, a)):
        lost = udp_loss(source, target, count=2000)
        # 5 % of 2000 packets: the standard deviation is 0.5 %
        assert 0.02 <= lost <= 0.08, f"{source.name}→{target.name}: {lost:.3f} lost"


def test_partition_cuts_one_host_off_and_heal_restores_it(netbed):
    a, b, c = (netbed.add_host(name) for name in "abc")
    assert reachable(a, b) and reachable(c, a)
    netbed.partition(a)
    assert not reachable(a, b) and not reachable(c, a)
    assert reachable(b, c), "the others must not notice"
    netbed.heal(a)
    assert reachable(a, b) and reachable(c, a)


def test_split_cuts_two_sides_apart_and_join_restores_them(netbed):
    a, b, c, d = (netbed.add_host(name) for name in "abcd")
    netbed.split([a, b], [c, d])
    assert reachable(a, b) and reachable(d, c), "each side still reaches itself"
    assert not reachable(a, c) and not reachable(d, b)
    netbed.join([a, b], [c, d])
    assert reachable(a, d) and reachable(c, b)


def test_a_host_behind_nat_dials_out_but_cannot_be_dialed(netbed):
    public = netbed.add_host("public")
    home = netbed.add_host("home", nat=True)
    result = tcp_transfer(home, public, 100_000)
    assert result["bytes"] == 100_000
    assert result["peer"] == "10.77.1.1", "the connection should come from the router's address"
    assert reachable(home, public)
    assert not reachable(public, home)


def test_teardown_removes_namespaces_and_processes_even_after_a_failure():
    reason = cached_unavailable_reason()
    if reason:
        pytest.skip(f"netns test bed unavailable: {reason}")
    with pytest.raises(RuntimeError, match="test failed here"), NetBed() as bed:
        host = bed.add_host("a", Link(delay_ms=1))
        sleeper = host.popen(["sleep", "600"])
        namespaces = bed.namespaces()
        forwarders = list(bed.forwarders)
        raise RuntimeError("test failed here")
    assert all(not (Path("/var/run/netns") / ns).exists() for ns in namespaces)
    assert sleeper.poll() is not None
    assert all(f.poll() is not None for f in forwarders)
