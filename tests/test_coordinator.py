"""The coordinator with real peers: bootstrap and spec over gRPC, metrics collected from the DHT,
training that does not depend on it, and forged records that change nothing."""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from hivemind.dht import DHT
from hivemind.utils.crypto import RSAPrivateKey

from potluck.coordinator.store import RunStore
from potluck.peer.net.run_status import key_fingerprint
from potluck.protocols.coordinator_client import CoordinatorClient
from potluck.protocols.records import (
    PeerReport,
    RunAnnouncement,
    announce_run,
    public_key_tag,
    publish_report,
    read_announcements,
    read_reports,
    record_validators,
)
from potluck.tools.coordinator_process import LocalCoordinator, free_port
from tests.browser import capture_page, find_chromium
from tests.helpers import address_of_a_peer_not_started, metric, wait_until
from tests.test_dashboard import body_attributes, peer_cells

pytestmark = pytest.mark.slow


def publish(coordinator: LocalCoordinator, spec_path: Path) -> str:
    with CoordinatorClient(coordinator.address) as client:
        return client.publish(spec_path.read_text()).run_id


def peer_step(peer_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{peer_port}/metrics", timeout=5) as response:
        return metric(response.read().decode(), "potluck_global_step") or 0


@pytest.mark.timeout(500)
def test_peers_join_through_the_coordinator_and_it_survives_a_restart(
    make_spec, local_swarm, coordinator, tmp_path
):
    coord = coordinator()
    spec_path = make_spec(max_global_steps=100000)
    run_id = publish(coord, spec_path)
    swarm = local_swarm(spec_path)  # published: the peers fetch it from the coordinator
    ports = [free_port(), free_port()]
    for name, port in zip(("a", "b"), ports, strict=True):
        swarm.start_peer(
            name,
            ["--coordinator", coord.address, "--min-peers", "2", "--metrics-port", str(port)],
            initial_peers=[],
            use_spec=False,
        )

    # the coordinator sees both peers and a rising global step, in /metrics and the dashboard's JSON
    def both_peers_rising():
        text = coord.get("/metrics")
        report = coord.run_report(run_id)
        steps = [p["global_step"] for p in report["history"]]
        return metric(text, "potluck_run_peers") == 2 and len(report["peers"]) == 2 and len(set(steps)) >= 3

    wait_until(both_peers_rising, 240, "both peers and a rising global step at the coordinator")
    assert metric(coord.get("/metrics"), "potluck_run_global_step") > 0

    # the peers' averaging accounting reaches the dashboard's JSON, /metrics and the page
    def accounting(row: dict) -> bool:
        utilisation = row["compute_utilisation"]
        return bool(row["bytes_sent"] and row["bytes_received"] and utilisation and 0 < utilisation <= 1)

    def accounting_reported():
        report = coord.run_report(run_id)
        rows = [*report["peers"], report["history"][-1]]
        return len(report["peers"]) == 2 and all(map(accounting, rows))

    wait_until(accounting_reported, 120, "both peers' averaging bytes and utilisation at the coordinator")
    text = coord.get("/metrics")
    assert metric_with(text, "potluck_run_averaging_bytes", 'direction="sent"') > 0
    assert 0 < metric(text, "potluck_run_compute_utilisation") <= 1
    if find_chromium() is not None:  # test_dashboard.py checks the formatting; here: real values arrive
        url = f"{coord.dashboard}?run={quote(run_id)}"
        page = capture_page(url, tmp_path / "profile", virtual_time_ms=6_000)
        body = body_attributes(page.dom)
        assert body.get("data-ready") == "1" and body["data-peer-rows"] == "2", page.dom[:3000]
        assert int(body["data-bytes-sent"]) > 0 and 0 < float(body["data-utilisation"]) <= 1
        sent, utilisation = peer_cells(page.dom, "bytes-sent"), peer_cells(page.dom, "utilisation")
        assert all(re.fullmatch(r"[\d.]+ (B|KiB|MiB|GiB)", cell) for cell in sent), sent
        assert all(re.fullmatch(r"[\d.]+ %", cell) for cell in utilisation), utilisation

    # kill it: training goes on without it
    history_before = len(coord.run_report(run_id)["history"])
    coord.kill()
    step_at_kill = peer_step(ports[0])
    wait_until(
        lambda: peer_step(ports[0]) >= step_at_kill + 5, 120, "5 more global steps without the coordinator"
    )
    assert all(p.running for p in swarm.peers)

    # restart on the same database (and DHT address/identity): runs and history are there, collection resumes
    restarted = coordinator(dht_port=coord.dht_port)
    with CoordinatorClient(restarted.address) as client:
        assert [r.run_id for r in client.list_runs()] == [run_id]
    assert len(restarted.run_report(run_id)["history"]) >= history_before
    wait_until(
        lambda: len(restarted.run_report(run_id)["history"]) >= history_before + 3,
        180,
        "collection to resume",
    )


@pytest.mark.timeout(400)
def test_forged_announcement_and_report_are_ignored_and_counted(
    make_spec, local_swarm, coordinator, tmp_path
):
    coord = coordinator()
    spec_path = make_spec(max_global_steps=100000)
    run_id = publish(coord, spec_path)
    swarm = local_swarm(spec_path)
    swarm.start_peer("a", ["--coordinator", coord.address], initial_peers=[], use_spec=False)

    # the test is a third party on the same DHT, with a key of its own
    intruder_key = RSAPrivateKey()
    intruder = DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=coord.dht_addresses(),
        record_validators=record_validators(intruder_key, (run_id,)),
    )  # fmt: skip
    try:
        real = wait_until(lambda: read_reports(intruder, run_id).records, 180, "peer a's report in the DHT")
        (owner, real_report), = real.items()  # fmt: skip

        # 1. a run announcement with the same run id under another key: stored, but nobody trusts it; the
        # running peer ignores the status it claims (finished), counts it, and trains on
        forged_spec = json.dumps({"run_id": run_id, "malicious": True})
        forged = RunAnnouncement(
            run_id=run_id, spec_json=forged_spec, status="finished", announced_at=time.time()
        )
        assert announce_run(intruder, public_key_tag(intruder_key), forged, ttl=120)
        trusted = read_announcements(intruder, coord.key_tag)
        assert json.loads(trusted.records[run_id].spec_json)["max_global_steps"] == 100000
        assert trusted.skipped["untrusted_announcement"] >= 1
        peer = swarm.peers[0]
        (seen,) = wait_until(lambda: peer.events("forged_run_status"), 60, "peer a to see the forgery")
        assert seen["status"] == "finished" and seen["key"] == key_fingerprint(public_key_tag(intruder_key))
        wait_until(
            lambda: [e for e in peer.events("global_step") if e["time"] > seen["time"]],
            60,
            "a global step of peer a after the forged 'finished'",
        )

        # 2. a report under peer a's subkey: every node refuses it; and one under the intruder's own key that
        # names peer a's id: stored (its signature is good), but the coordinator refuses it, since a's id is
        # not the id of the key that signed it (a peer signs with its identity's key)
        fake = real_report.copy(update={"global_step": 10**9, "reported_at": time.time() + 1})
        assert publish_report(intruder, owner, run_id, PeerReport(**fake.dict()), ttl=60, wait=True) is False
        assert publish_report(
            intruder, public_key_tag(intruder_key), run_id, PeerReport(**fake.dict()), ttl=60, wait=True
        )

        def counted():
            text = coord.get("/metrics")
            return all(
                metric_with(text, "potluck_dht_records_rejected_total", f'reason="{reason}"') >= 1
                for reason in ("signature", "untrusted_announcement", "peer_id_mismatch")
            )

        wait_until(counted, 60, "the coordinator to count the three forgeries")
        still = read_reports(intruder, run_id).records[owner]
        assert still.peer_id == real_report.peer_id and still.global_step < 10**9
        assert max(p["global_step"] for p in coord.run_report(run_id)["history"]) < 10**9

        # 3. a newcomer that only knows the DHT and the trusted key gets the real spec
        key_file = tmp_path / "coordinator.pub"
        key_file.write_bytes(coord.key_tag)
        newcomer = swarm.start_peer(
            "dht-only",
            ["--run", run_id, "--coordinator-key", str(key_file), "--max-steps", "1"],
            initial_peers=coord.dht_addresses(),
            use_spec=False,
        )
        assert newcomer.process.wait(timeout=180) == 0, newcomer.log()[-3000:]
        assert newcomer.summary().run_id == run_id, newcomer.log()[-3000:]

        # 4. paused by its real coordinator, peer a holds; it still leaves within seconds on SIGTERM
        paused_at = time.time()
        with CoordinatorClient(coord.address) as client:
            client.set_status(run_id, "paused")
        wait_until(
            lambda: [
                e for e in peer.events("run_status") if e["status"] == "paused" and e["time"] >= paused_at
            ],
            30,
            "peer a to hold",
        )
        signalled = time.monotonic()
        peer.process.send_signal(signal.SIGTERM)
        assert peer.process.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 10, peer.log()[-3000:]
        summary = peer.summary()
        assert summary.exit_reason == "signal" and summary.forged_status_records == 1, summary
    finally:
        intruder.shutdown()


def metric_with(text: str, name: str, label: str) -> float:
    match = re.search(rf"^{name}{{[^}}]*{re.escape(label)}[^}}]*}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.timeout(180)
def test_a_coordinator_whose_remembered_peers_are_gone_starts_a_new_swarm(coordinator, tmp_path):
    """Restarted after the whole swarm ended, it finds none of the peers it remembers: it must still come
    up (and peers can join its new swarm), not die on the first dial nor wait out a minute."""
    gone, _, _ = address_of_a_peer_not_started(tmp_path)
    (tmp_path / "coordinator").mkdir()
    RunStore(tmp_path / "coordinator" / "coordinator.db").remember_peer_addresses(
        {"gone": [gone]}, time.time()
    )
    coord = coordinator()
    assert "starting a new swarm" in coord.log(), coord.log()[-3000:]
    assert "(attempt 1)" in coord.log()  # it did try the remembered peer, more than once
    with CoordinatorClient(coord.address) as client:
        assert client.list_runs() == []
    # its new swarm takes peers (hivemind raises if no initial peer answers)
    DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=coord.dht_addresses()).shutdown()
