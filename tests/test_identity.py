"""A peer's records are signed with the key behind its peer id, so a reader can check the peer id a report
names (issue 17, "reports bound to keys"); a reader refuses reports that name another peer's id, replay an older
report, or come from the future, and counts each once."""

from __future__ import annotations

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from potluck.hivemind_ext.dht import start_dht
from potluck.hivemind_ext.keys import peer_id_of_owner, read_identity, sign_records_with_identity
from potluck.protocols.records import MAX_CLOCK_SKEW, PeerReport, ReportGate, public_key_tag

NOW = 1_800_000_000.0


def report(peer_id: str, reported_at: float) -> PeerReport:
    return PeerReport(
        peer_id=peer_id, global_step=3, loss=1.0, samples_per_second=10.0, samples_total=30,
        averaging_succeeded=3, averaging_failed=0, reported_at=reported_at,
    )  # fmt: skip


@pytest.mark.unit
def test_the_gate_admits_a_peers_own_reports_and_refuses_forged_replayed_and_future_ones():
    honest, intruder = public_key_tag(RSAPrivateKey()), public_key_tag(RSAPrivateKey())
    honest_id = peer_id_of_owner(honest)
    assert honest_id is not None and honest_id != peer_id_of_owner(intruder)
    gate = ReportGate()
    assert gate.admit(honest, report(honest_id, NOW), NOW)
    assert gate.admit(honest, report(honest_id, NOW), NOW + 5)  # the same record, read again
    assert gate.admit(honest, report(honest_id, NOW + 5), NOW + 5)

    for _ in range(3):  # a collector reads the same records every round: refused each time, counted once
        assert not gate.admit(intruder, report(honest_id, NOW + 6), NOW + 6)  # signed by another key
        assert not gate.admit(honest, report(honest_id, NOW), NOW + 6)  # older than one admitted
        assert not gate.admit(honest, report(honest_id, NOW + 7 + MAX_CLOCK_SKEW), NOW + 6)
    assert gate.refused == {"peer_id_mismatch": 1, "replayed": 1, "from_the_future": 1}
    assert gate.admit(honest, report(honest_id, NOW + 10), NOW + 10)  # and the honest peer goes on
    assert peer_id_of_owner(b"[owner:not a key]") is None and peer_id_of_owner(b"no tag") is None


@pytest.mark.unit
def test_a_private_runs_gate_refuses_reports_of_peers_without_a_token_and_counts_each_once():
    member, outsider = public_key_tag(RSAPrivateKey()), public_key_tag(RSAPrivateKey())
    member_id, outsider_id = peer_id_of_owner(member), peer_id_of_owner(outsider)
    gate = ReportGate(admits=lambda peer_id: peer_id == member_id)  # the collector's: AccessList.admits
    assert gate.admit(member, report(member_id, NOW), NOW)
    for _ in range(3):
        assert not gate.admit(outsider, report(outsider_id, NOW), NOW)
    assert gate.refused == {"no_access_token": 1}


@pytest.fixture
def process_key():
    """This test changes the process-wide signing key; the others in this process keep theirs."""
    before = RSAPrivateKey._process_wide_key
    yield
    RSAPrivateKey._process_wide_key = before


@pytest.mark.integration
def test_a_dht_started_with_its_identity_has_the_peer_id_of_the_key_that_signs_its_records(
    process_key, tmp_path
):
    path = tmp_path / "peer.id"
    identity = sign_records_with_identity(path)
    assert identity.fresh and not identity.temporary and path.exists()
    dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None, identity=identity)
    try:
        signer = RSAPrivateKey.process_wide()
        assert signer.to_bytes() == read_identity(path).to_bytes()
        assert peer_id_of_owner(public_key_tag(signer)) == dht.peer_id.to_base58()
    finally:
        dht.shutdown()
    # a restart with the same file: the same key, not a fresh identity
    again = sign_records_with_identity(path)
    assert not again.fresh and RSAPrivateKey.process_wide().to_bytes() == signer.to_bytes()

    # without --identity-path: a temporary identity, gone once the DHT has started
    temporary = sign_records_with_identity(None)
    dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None, identity=temporary)
    try:
        assert not temporary.path.exists()
        assert peer_id_of_owner(public_key_tag(RSAPrivateKey.process_wide())) == dht.peer_id.to_base58()
    finally:
        dht.shutdown()
