"""``run-peer --results``: the event stream is one well-formed JSON object per line, and the summary is its
last line however the role ends (see tests/test_swarm.py and others for real peers writing it)."""

from __future__ import annotations

import json
import threading

import pytest

from potluck.peer.averaging.strategy import round_phases
from potluck.peer.cli import main
from potluck.peer.results import PeerResults, PeerSummary, RoundCounts, StateLoad, read_events, read_summary
from potluck.peer.training.metrics import PeerMetrics

pytestmark = pytest.mark.unit


def lines(path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # raises on a malformed line


def test_events_and_summary_of_a_training_peer(tmp_path):
    path = tmp_path / "out" / "peer.events.jsonl"
    metrics = PeerMetrics("run")
    with PeerResults(path, role="trainer") as results:
        listener = results.listener(metrics)
        results.joined("QmPeer", "run", ["/ip4/127.0.0.1/tcp/1/p2p/QmPeer"])
        results.state_loaded(3, "QmDonor", 4)
        listener.averaging_round(False, 2, 0, 0)
        listener.averaging_round(True, 2, 100, 100, 0.5)
        metrics.local_step(float("nan"), 8, 0.1, 80.0)  # a NaN loss must not make the line invalid JSON
        results.global_step(5)
        listener.averaging_round(True, 3, 10, 10, 0.5)
        # the next step came by download, not by this round; one download before it was thrown away, and the one
        # taken had no two donors vouching for it (a robust aggregator's last resort)
        listener.state_download(True, 1.0, discarded=1, unvouched=1)
        results.global_step(6)
        listener.averaging_round(True, 1, 0, 0)
        results.checkpoint(6, tmp_path / "checkpoint-6")
        results.trained(6, 3, 24, 1.5, "max_steps")
        # the summary is the last line, so nothing is written after it is due
        assert read_summary(path) is None

    events = lines(path)
    assert [e["event"] for e in events] == [
        "joined", "state_loaded", "averaging_round", "averaging_round", "global_step", "averaging_round",
        "state_download", "global_step", "averaging_round", "checkpoint", "summary",
    ]  # fmt: skip
    assert events == read_events(path)
    steps = [e for e in events if e["event"] == "global_step"]
    assert steps[0]["round"] == {"outcome": "succeeded", "group_size": 2} and steps[0]["loss"] is None
    assert steps[1]["round"] is None
    summary = read_summary(path)
    assert summary == PeerSummary(
        role="trainer",
        exit_reason="max_steps",
        run_id="run",
        peer_id="QmPeer",
        global_step=6,
        local_steps=3,
        samples=24,
        last_loss=1.5,
        rounds=RoundCounts(succeeded=2, failed=1, alone=1),
        bytes_sent=110,
        bytes_received=110,
        compute_utilisation=summary.compute_utilisation,
        state_loads=[StateLoad(3, "QmDonor", 4)],
        state_downloads_discarded=1,
        state_downloads_unvouched=1,
        checkpoint=str(tmp_path / "checkpoint-6"),
        seconds=summary.seconds,
    )
    # the metrics saw the rounds too (Prometheus, the DHT report)
    assert (metrics.latest["averaging_succeeded"], metrics.latest["averaging_alone"]) == (2, 1)
    downloads = {
        outcome: metrics.registry.get_sample_value(
            "potluck_state_downloads_total", {"run_id": "run", "outcome": outcome}
        )
        for outcome in ("succeeded", "discarded", "unvouched")
    }
    assert downloads == {"succeeded": 1, "discarded": 1, "unvouched": 1}


def test_a_rounds_phases_reach_its_event_and_the_metrics(tmp_path):
    # where a DiLoCo round's time went: 0.3 s to form the group, 0.2 s all-reduce, 0.05 s to reach the trainer,
    # 0.01 s for the outer step
    phases = round_phases(10.0, 10.3, 10.5, 10.55, 10.56)
    assert phases == pytest.approx({"group": 0.3, "all_reduce": 0.2, "handoff": 0.05, "apply": 0.01})
    assert round_phases(10.0, 0.0, 0.0, 10.55, 10.56) is None  # the averager recorded no group for it
    assert round_phases(10.0, 9.0, 10.5, 10.55, 10.56) is None  # a group of an earlier round
    path = tmp_path / "peer.events.jsonl"
    metrics = PeerMetrics("run")
    with PeerResults(path, role="trainer") as results:
        results.listener(metrics).averaging_round(True, 4, 10, 10, 0.56, kept=True, phases=phases)
    (event,) = [e for e in lines(path) if e["event"] == "averaging_round"]
    assert event["phases"] == phases and event["kept"] is True
    for phase, seconds in phases.items():
        labels = {"run_id": "run", "phase": phase}
        assert metrics.registry.get_sample_value("potluck_averaging_round_phase_seconds_count", labels) == 1
        assert metrics.registry.get_sample_value(
            "potluck_averaging_round_phase_seconds_sum", labels
        ) == pytest.approx(seconds)


def test_the_summary_is_written_when_the_role_raises(tmp_path):
    path = tmp_path / "peer.events.jsonl"
    with pytest.raises(RuntimeError), PeerResults(path, role="client") as results:
        results.joined("QmPeer", "run", [])
        raise RuntimeError("no route to block 3")
    summary = read_summary(path)
    assert summary.exit_reason == "error: RuntimeError: no route to block 3"
    assert (summary.role, summary.peer_id) == ("client", "QmPeer")


def test_a_second_signal_counts_as_a_signal(tmp_path):
    path = tmp_path / "peer.events.jsonl"
    with pytest.raises(SystemExit), PeerResults(path, role="trainer"):
        raise SystemExit(143)  # what install_stop_handlers raises on the second SIGTERM
    assert read_summary(path).exit_reason == "signal"


def test_events_from_many_threads_stay_whole_lines(tmp_path):
    path = tmp_path / "peer.events.jsonl"
    with PeerResults(path, role="trainer") as results:
        listener = results.listener(PeerMetrics("run"))
        writers = [
            threading.Thread(
                target=lambda: [listener.averaging_round(True, 2, 1, 1, 0.1) for _ in range(200)]
            )
            for _ in range(4)
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
    events = lines(path)
    assert len(events) == 801
    assert read_summary(path).rounds.succeeded == 800


def test_run_peer_writes_a_summary_for_a_user_error(tmp_path):
    """An invalid run spec fails before anything starts; the summary still says why."""
    spec = tmp_path / "run.yaml"
    spec.write_text("run_id: x\n")
    path = tmp_path / "peer.events.jsonl"
    assert main(["--run-spec", str(spec), "--results", str(path)]) == 2
    (summary,) = lines(path)
    assert summary["event"] == "summary"
    assert summary["exit_reason"].startswith("error: ") and "run.yaml" in summary["exit_reason"]
