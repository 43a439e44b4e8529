"""``potluck swarm``: ``up`` runs until the peers finish, ``init`` (compose's one-shot service) publishes once."""

from __future__ import annotations

import subprocess

import pytest

from potluck.protocols.coordinator_client import CoordinatorClient
from potluck.tools.coordinator_process import LocalCoordinator
from potluck.tools.demo import DEMO_SPEC
from potluck.tools.swarm import main as swarm_main
from tests.conftest import _STARTED_GROUPS
from tests.test_operations import cli


def potluck(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # own session: a peer left behind by a failure is still killed at the end of the test session
    process = subprocess.Popen(
        [*cli("potluck"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    _STARTED_GROUPS.add(process.pid)
    out, _ = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out)


def test_swarm_up_refuses_a_workdir_it_did_not_create(tmp_path, capsys):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    assert swarm_main(["up", "--workdir", str(tmp_path)]) == 2
    assert "not a swarm's workdir" in capsys.readouterr().err
    assert precious.read_text() == "mine"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_swarm_up_ends_when_the_peers_reach_the_last_step(tmp_path):
    workdir = tmp_path / "swarm"
    done = potluck("swarm", "up", "--peers", "2", "--max-steps", "3", "--workdir", str(workdir), timeout=200)
    assert done.returncode == 0, done.stdout[-4000:]
    assert done.stdout.count("run-peer: reached the last global step: global step 3") == 2
    assert "== coordinator up: dashboard http://127.0.0.1:" in done.stdout
    # a second start wipes its own workdir and starts afresh (the run is published again)
    again = potluck("swarm", "up", "--peers", "1", "--max-steps", "1", "--workdir", str(workdir), timeout=200)
    assert again.returncode == 0, again.stdout[-4000:]
    assert f"run '{DEMO_SPEC['run_id']}' published" in again.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_swarm_init_builds_the_demo_and_publishes_it_once(tmp_path):
    coordinator = LocalCoordinator(tmp_path / "coordinator").start()
    _STARTED_GROUPS.add(coordinator.process.pid)
    try:
        workdir = tmp_path / "data" / "demo"
        args = ["swarm", "init", "--workdir", str(workdir), "--coordinator", coordinator.address]
        first = potluck(*args, "--max-steps", "7", timeout=120)
        assert first.returncode == 0 and "published at" in first.stdout, first.stdout
        # compose runs it again on every `docker compose up`: the run stays as it was
        second = potluck(*args, timeout=120)
        assert second.returncode == 0 and "was already published" in second.stdout, second.stdout
        with CoordinatorClient(coordinator.address) as client:
            (run,) = client.list_runs()
        assert run.run_id == DEMO_SPEC["run_id"] and run.spec["max_global_steps"] == 7
        assert run.spec["model"]["name_or_path"] == str(workdir / "tiny-model")  # absolute, for peers
    finally:
        coordinator.stop()
