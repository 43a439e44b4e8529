"""A peer forked from the warm template (``tools/warm_peers.py``) answers as a launched ``run-peer`` does: its
errors, exit codes, signals, own session and output, and random numbers of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from potluck.peer.results import read_events
from tests.conftest import WARM_PEERS
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_a_forked_peer_reports_a_bad_flag_as_run_peer_does(tmp_path):
    launched = subprocess.run(
        [sys.executable, "-m", "potluck.peer.launch", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = tmp_path / "bad.log"
    forked = WARM_PEERS.start(["--no-such-flag"], log, _env())
    assert forked.wait(timeout=120) == launched.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in log.read_text() and log.read_text() == launched.stderr


def test_a_forked_peer_leads_its_own_session_and_ends_by_a_signal(tmp_path, make_spec):
    results = tmp_path / "lone.events.jsonl"
    argv = ["--run-spec", str(make_spec()), "--min-peers", "2", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
            "--results", str(results)]  # fmt: skip
    peer = WARM_PEERS.start(argv, tmp_path / "lone.log", _env())
    try:
        wait_until(lambda: read_events(results), 120, "the lone peer to join")
        assert os.getpgid(peer.pid) == peer.pid != os.getpgid(0)
        assert peer.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            peer.wait(timeout=0.1)
    finally:
        os.killpg(peer.pid, signal.SIGKILL)
    assert peer.wait(timeout=30) == -signal.SIGKILL


def test_forked_peers_draw_their_own_random_numbers(tmp_path):
    """Forks of one template share its state; a fresh interpreter seeds ``random`` and numpy from the OS."""
    draws = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.txt"
        process = WARM_PEERS.context.Process(target=_draw, args=(str(out),))
        process.start()
        process.join(60)
        draws.append(out.read_text().split())
    assert all(a != b for a, b in zip(*draws, strict=True)), draws  # random, numpy, torch


def _draw(path: str) -> None:
    import random

    import numpy
    import torch

    from potluck.tools.warm_peers import fresh_random_state

    fresh_random_state()
    with open(path, "w") as f:
        f.write(f"{random.random()} {numpy.random.random()} {torch.rand(1).item()}")
