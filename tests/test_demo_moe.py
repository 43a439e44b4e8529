"""``potluck demo --moe`` as a user runs it: two expert servers and a client on the tiny mixture of experts learn the
demo task, and the before/after table says so."""

from __future__ import annotations

import subprocess
import sys

import pytest

from potluck.peer.results import read_events, read_summary
from potluck.tools.demo_moe import RESULTS

pytestmark = [pytest.mark.slow]


def test_demo_moe_trains_through_expert_servers_and_prints_before_and_after(tmp_path):
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "potluck.tools.cli", "demo", "--moe", "--max-steps", "100", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]  # 0: the held-out accuracy rose
    assert "exact-match accuracy" in output  # the before/after table
    events = read_events(workdir / RESULTS)
    evaluated = {e["when"]: e for e in events if e["event"] == "evaluated"}
    assert evaluated["after"]["loss"] < evaluated["before"]["loss"] / 2, evaluated
    assert evaluated["after"]["accuracy"] > evaluated["before"]["accuracy"], evaluated
    (servers,) = [e for e in events if e["event"] == "expert_servers"]
    assert len(servers["peer_ids"]) == 2
    (counters,) = [e for e in events if e["event"] == "shard_client"]
    assert counters["dropped"] == 0 and counters["failures"] == 0, counters  # every expert answered
    summary = read_summary(workdir / RESULTS)
    assert (summary.role, summary.global_step, summary.exit_reason) == ("client", 100, "finished"), (
        summary
    )  # the run's last step
    assert "Warning" not in output
