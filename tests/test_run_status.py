"""A running swarm obeys its run's status at the coordinator (issue #18): paused, its peers take no global
step and stay in the swarm; active again, they step on together; finished, each saves and exits 0."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from potluck.coordinator import run_cli
from potluck.protocols.coordinator_client import CoordinatorClient
from potluck.tools.peer_processes import PeerProcess
from tests.helpers import wait_until

pytestmark = pytest.mark.slow


def steps_after(peer: PeerProcess, after: float, until: float = float("inf")) -> list[dict]:
    return [e for e in peer.events("global_step") if after < e["time"] < until]


def acted(peer: PeerProcess, status: str, after: float) -> dict | None:
    """The peer's first ``run_status`` event of ``status`` after ``after``."""
    found = [e for e in peer.events("run_status") if e["status"] == status and e["time"] >= after]
    return found[0] if found else None


@pytest.mark.timeout(240)
def test_a_swarm_pauses_resumes_and_finishes_from_the_coordinator(
    make_spec, local_swarm, coordinator, tmp_path
):
    coord = coordinator()
    with CoordinatorClient(coord.address) as client:
        spec_path = make_spec(max_global_steps=100000)
        run_id = client.publish(spec_path.read_text()).run_id
    swarm = local_swarm(spec_path)  # published: the peers fetch it from the coordinator
    peers = [
        swarm.start_peer(
            name,
            ["--coordinator", coord.address, "--min-peers", "2", "--save-dir", str(tmp_path / name)],
            initial_peers=[],
            use_spec=False,
        )
        for name in ("a", "b")
    ]
    wait_until(lambda: all(steps_after(p, 0) for p in peers), 180, "a global step on each peer")

    def set_status(status: str) -> float:
        at = time.time()
        assert run_cli.main(["status", run_id, status, "--coordinator", coord.address]) == 0
        return at

    def all_acted(status: str, after: float) -> list[dict] | None:
        found = [acted(p, status, after) for p in peers]
        return found if all(found) else None

    # paused: each peer holds within a few seconds, and says so once
    paused_at = set_status("paused")
    holds = wait_until(lambda: all_acted("paused", paused_at), 30, "both peers to hold")

    # still in the swarm while held: each reports to the coordinator again, at the step it holds
    def reports_while_held() -> bool:
        rows = {row["peer_id"]: row for row in coord.run_report(run_id)["peers"]}
        return all(
            rows.get(p.peer_id(), {}).get("reported_at", 0) > hold["time"] + 1
            for p, hold in zip(peers, holds, strict=True)
        )

    wait_until(reports_while_held, 30, "a report from each peer while it holds")
    rows = {row["peer_id"]: row for row in coord.run_report(run_id)["peers"]}
    for peer, hold in zip(peers, holds, strict=True):
        assert peer.running, peer.log()[-3000:]
        assert rows[peer.peer_id()]["global_step"] == hold["global_step"]

    # active again: both step on, averaging together
    resumed_at = set_status("active")
    resumes = wait_until(lambda: all_acted("active", resumed_at), 30, "both peers to resume")
    for peer, hold, resume in zip(peers, holds, resumes, strict=True):
        assert not steps_after(peer, hold["time"], until=resume["time"]), f"{peer.name} stepped while paused"
        assert resume["global_step"] == hold["global_step"] and resume["paused_seconds"] > 0
        assert [e for e in peer.events("run_status") if e["status"] == "paused"] == [hold]  # said once
        # the pause broke no round: none failed while a peer held or let go of what it had scheduled
        failed = [
            e for e in peer.events("averaging_round") if paused_at <= e["time"] and e["outcome"] == "failed"
        ]
        assert not failed, failed

    def averaged_together_after_resume() -> bool:
        return all(
            any(
                (e["round"] or {}).get("outcome") == "succeeded" and e["round"]["group_size"] == 2
                for e in steps_after(peer, resume["time"])
            )
            for peer, resume in zip(peers, resumes, strict=True)
        )

    wait_until(averaged_together_after_resume, 60, "a global step averaged by both peers after the resume")

    # finished: each saves a checkpoint of the step it ends at and exits 0
    finished_at = set_status("finished")
    assert swarm.wait_all(60) == [0, 0]
    for peer in peers:
        summary = peer.summary()
        assert summary.exit_reason == "run_finished", peer.log()[-3000:]
        assert acted(peer, "finished", finished_at)["global_step"] == summary.global_step
        checkpoint = peer.events("checkpoint")[-1]
        assert checkpoint["global_step"] == summary.global_step and Path(checkpoint["path"]).is_dir()
