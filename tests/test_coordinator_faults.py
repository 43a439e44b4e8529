"""The coordinator dies while the swarm is already in trouble (issue #7, acceptance 8): peers that
joined through it keep taking global steps while it is gone and a peer stalls, then is killed.

On loopback, so the stall stands in for the partition of tests/test_faults.py: ``SIGSTOP`` freezes
a peer, its connections go silent exactly as a cut link's do (nothing is reset, nothing answers),
and ``SIGCONT`` heals it. What it does not emulate is the frozen peer's own view (it sees no time
pass); the partition itself is tested on the network test bed without a coordinator.
"""

from __future__ import annotations

import os
import signal

import pytest

from potluck.tools.coordinator_process import free_port
from tests.helpers import wait_until
from tests.test_coordinator import peer_step, publish

pytestmark = pytest.mark.slow


def step_of(port: int) -> float:
    try:
        return peer_step(port)
    except OSError:  # not serving yet, or frozen: no answer in time
        return -1


@pytest.mark.timeout(600)
def test_training_goes_on_when_the_coordinator_dies_during_a_stall_and_a_kill(
    make_spec,
    local_swarm,
    coordinator,  # noqa: F811  (the fixture imported above)
    tmp_path,
):
    coord = coordinator()
    spec_path = make_spec(max_global_steps=100000)
    publish(coord, spec_path)
    swarm = local_swarm(spec_path)  # published: the peers fetch it from the coordinator
    ports = {name: free_port() for name in ("a", "b", "c")}
    peers = {
        name: swarm.start_peer(
            name,
            ["--coordinator", coord.address, "--min-peers", "3", "--metrics-port", str(port)],
            initial_peers=[],
            use_spec=False,
        )
        for name, port in ports.items()
    }
    wait_until(lambda: min(step_of(p) for p in ports.values()) >= 2, 300, "3 peers past global step 2")

    def survivors_pass(step: float, what: str) -> None:
        wait_until(lambda: min(step_of(ports["a"]), step_of(ports["b"])) >= step, 180, what)

    # the coordinator dies (SIGKILL: no goodbye) while c stalls: a and b go on without both
    coord.kill()
    os.killpg(peers["c"].process.pid, signal.SIGSTOP)  # the peer and its DHT, averagers, p2pd
    stalled_at = max(step_of(ports["a"]), step_of(ports["b"]))
    survivors_pass(stalled_at + 3, "a and b to take 3 global steps without the coordinator and c")

    # c comes back (no coordinator to ask) and catches up with the swarm
    os.killpg(peers["c"].process.pid, signal.SIGCONT)
    healed_at = max(step_of(ports["a"]), step_of(ports["b"]))
    wait_until(lambda: step_of(ports["c"]) >= healed_at + 1, 180, "c to rejoin and take a global step")

    # still without the coordinator, c is killed: a and b go on
    os.kill(peers["c"].process.pid, signal.SIGKILL)
    killed_at = max(step_of(ports["a"]), step_of(ports["b"]))
    survivors_pass(killed_at + 3, "a and b to take 3 global steps after the kill")
    assert peers["a"].running and peers["b"].running, "nobody crashed"
    assert coord.process.poll() is not None, "the coordinator stayed dead throughout"
