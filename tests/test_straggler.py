"""A peer 5x slower than the others (issue #7, acceptance 6): the swarm keeps stepping and the
straggler's samples still go into global steps. How much it slows the others is measured, not
asserted, by bench/straggler.py (figures in docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from potluck.tools.coordinator_process import free_port
from tests.helpers import metric, scrape, start_first, wait_until
from tests.test_faults import succeeded_rounds

pytestmark = pytest.mark.slow

SLOW_PEER = Path(__file__).resolve().parents[1] / "bench" / "slow_peer.py"
"""run-peer as a machine FACTOR times slower (its first argument)."""


def read(port: int) -> str:
    try:
        return scrape(port)
    except OSError:  # not serving yet
        return ""


@pytest.mark.timeout(600)
def test_a_straggler_does_not_stop_the_swarm_and_its_samples_count(make_spec, local_swarm, tmp_path):
    # a global step spans several of the fast peers' batches (1024 = 16 of them): the straggler can
    # finish one of its own within a step (see bench/straggler.py for target 256)
    swarm = local_swarm(make_spec(max_global_steps=100000, batch={"target_batch_size": 1024}))
    ports = {name: free_port() for name in ("fast0", "fast1", "slow")}
    _, address = start_first(
        swarm, "fast0", ["--min-peers", "3", "--metrics-port", str(ports["fast0"])], tmp_path
    )
    swarm.start_peer(
        "fast1", ["--min-peers", "3", "--metrics-port", str(ports["fast1"])], initial_peers=[address]
    )
    swarm.start_peer(
        "slow", ["--min-peers", "3", "--metrics-port", str(ports["slow"])], initial_peers=[address],
        entry=(str(SLOW_PEER), "5"),
    )  # fmt: skip

    def step(name: str) -> float:
        return metric(read(ports[name]), "potluck_global_step") or 0

    wait_until(lambda: min(step(name) for name in ports) >= 1, 300, "every peer's first global step")
    started, rounds = step("fast0"), succeeded_rounds(read(ports["slow"]))
    # after the common start, the straggler's gradients still go into successful all-reduces: its
    # samples count in global steps
    wait_until(
        lambda: succeeded_rounds(read(ports["slow"])) > rounds, 240, "an averaging round with the straggler"
    )
    wait_until(
        lambda: min(step("fast0"), step("fast1")) >= started + 5, 240, "5 global steps of the fast peers"
    )
    assert all(peer.running for peer in swarm.peers)
