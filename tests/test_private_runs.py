"""A private run over real p2p (issue 17): a peer without a valid access token cannot join an averaging group,
download state, call a shard span or have its shard announcements read; each refusal is counted; a peer whose
token is no longer renewed (revoked) is out within one token lifetime. Averagers are Potluck's layers over
hivemind's (``hivemind_ext/access.py``), each on its own DHT; tokens are published as peers publish them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p.p2p_daemon import P2P
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey
from safetensors.torch import load_file

from potluck.hivemind_ext import access as gate
from potluck.hivemind_ext.dht import start_dht, visible_addresses
from potluck.hivemind_ext.donors import CheckedDownloads, LimitedDonor
from potluck.hivemind_ext.keys import peer_id_of_owner, read_identity
from potluck.hivemind_ext.layers import PeerRounds
from potluck.hivemind_ext.rounds import received_fraction
from potluck.peer.shard import wire
from potluck.peer.shard.blocks import load_block_span
from potluck.peer.shard.client.generate import generate_text
from potluck.peer.shard.server.service import ServerLimits, ShardServicer, serve_on, stop_serving
from potluck.protocols.access import access_key, issue_token, token_checker
from potluck.protocols.records import public_key_tag, record_validators
from potluck.protocols.runspec import AccessSpec, load_run_spec
from potluck.protocols.shards import SHARD_PROTOCOL_VERSION, ShardAnnouncement, read_shards, shards_key
from potluck.tools.access_cli import main as access_main
from potluck.tools.access_cli import publish_approved
from tests.helpers import outcomes_of, peer_id_of, start_first, wait_until
from tests.test_swarm import checkpoint_at

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

RUN = "private"
OWNER = RSAPrivateKey()
OWNER_TAG = public_key_tag(OWNER).decode()
SIZE = 1000
HIDDEN = 128


class _Averager(CheckedDownloads, LimitedDonor, PeerRounds):
    """Potluck's layers as the state averager stacks them, serving its tensors."""

    def get_current_state(self):
        with self.get_tensors() as tensors:
            state = [t.clone() for t in tensors]
        return self.with_manifest({"epoch": 1}, state)


def publish(dht, peer_id: str, ttl: float) -> float:
    """Publish a token for ``peer_id`` as its peer does (under its own subkey); returns its expiry."""
    expires = time.time() + ttl
    dht.store(access_key(RUN), subkey=peer_id.encode(), value=issue_token(OWNER, RUN, peer_id, ttl),
              expiration_time=expires)  # fmt: skip
    return expires


@dataclass
class Swarm:
    members: list
    """Two averagers that a test gives tokens."""
    outsider: object
    dhts: list


@pytest.fixture
def swarm() -> Iterator[Swarm]:
    dhts, averagers = [], []
    try:
        for _ in range(3):
            dhts.append(
                start_dht(visible_addresses(dhts[0]) if dhts else [], ["/ip4/127.0.0.1/tcp/0"], [], None)
            )
        gate.admit_with(gate.AccessList(access_key(RUN), token_checker(RUN, OWNER_TAG), dhts[0]))
        for dht, value in zip(dhts, (1.0, 3.0, 100.0), strict=True):  # forked with the list
            averagers.append(_Averager([torch.full((SIZE,), value)], dht, prefix=RUN, target_group_size=3,
                                       min_matchmaking_time=1.0, request_timeout=0.5, allreduce_timeout=10.0,
                                       next_chunk_timeout=2.0, start=True))  # fmt: skip
        yield Swarm(averagers[:2], averagers[2], dhts)
    finally:
        gate.admit_with(None)
        for averager in averagers:
            averager.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()


def _values(averager) -> torch.Tensor:
    with averager.get_tensors() as tensors:
        return tensors[0].clone()


def _set(averager, value: float) -> None:
    with averager.get_tensors() as tensors:
        tensors[0].fill_(value)


def _round(averagers) -> list:
    """One round of ``averagers`` at once: each one's gathered result, or the exception it ended with."""
    return outcomes_of([a.step(wait=False, timeout=10, allow_retries=False) for a in averagers], 30)


def _averaged(outcome) -> bool:
    return isinstance(outcome, dict) and received_fraction(outcome) == 1.0


def test_only_peers_with_a_token_average_together_and_serve_state(swarm):
    a, b = swarm.members
    for member in swarm.members:
        publish(swarm.dhts[0], str(member.peer_id), ttl=600)
    before = gate.refused_calls()

    def refused() -> dict:
        return {k: v - before[k] for k, v in gate.refused_calls().items()}

    # A round may miss its group on a busy machine, and the members may form theirs before the outsider's
    # matchmaking reaches them (a suite run: a round averaged with no refusal counted): rounds go on until the
    # members averaged in one and the outsider was turned away at least once. It must never get in.
    for _ in range(6):
        for averager, value in ((a, 1.0), (b, 3.0), (swarm.outsider, 100.0)):
            _set(averager, value)
        outcomes = _round([a, b, swarm.outsider])
        assert torch.equal(_values(swarm.outsider), torch.full((SIZE,), 100.0)), "the outsider averaged"
        assert not _averaged(outcomes[2]), outcomes[2]
        turned_away = refused()["join"] + refused()["leader"]
        if _averaged(outcomes[0]) and _averaged(outcomes[1]) and turned_away > 0:
            break
    assert set(outcomes[0]) == set(outcomes[1]) == {a.peer_id, b.peer_id}, outcomes
    assert torch.equal(_values(a), torch.full((SIZE,), 2.0)) and torch.equal(_values(b), _values(a))
    # the outsider asked the members to take it in, or they saw it lead and did not ask it
    assert refused()["join"] + refused()["leader"] > 0, (refused(), outcomes[2])

    assert swarm.outsider.load_state_from_peers(timeout=10) is None  # both members turn it away
    assert gate.refused_calls()["download"] > before["download"]
    _set(b, 7.0)
    _, state = a.load_state_from_peers(timeout=10)  # from the other member, never from the outsider
    assert torch.equal(state[0], torch.full((SIZE,), 7.0))


def test_a_peer_whose_token_is_no_longer_renewed_is_out_within_one_token_lifetime(swarm):
    a, b = swarm.members
    ttl = 6.0
    revoked = threading.Event()
    expiry = [0.0]

    def renew() -> None:  # the owner renews b's token every second, as a peer reads its renewed file
        while True:
            expiry[0] = publish(swarm.dhts[0], str(b.peer_id), ttl)
            if revoked.wait(1.0):  # ends the moment the test revokes b
                return

    publish(swarm.dhts[0], str(a.peer_id), ttl=600)
    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        wait_until(lambda: expiry[0] > 0, 10, "b's first short token")
        for _ in range(4):
            _set(a, 1.0), _set(b, 3.0)
            outcomes = _round([a, b])
            if all(map(_averaged, outcomes)):
                break
        assert torch.equal(_values(a), torch.full((SIZE,), 2.0)), outcomes
    finally:
        revoked.set()  # no more tokens for b
        renewer.join()
    revoked_at = time.time()
    wait_until(lambda: time.time() > expiry[0], ttl + 5, "b's last token to expire")
    assert (
        time.time() - revoked_at <= ttl + 1.5
    )  # its last token lived at most one lifetime past the revocation
    before = gate.refused_calls()
    _set(a, 1.0), _set(b, 3.0)
    outcomes = _round([a, b])
    assert torch.equal(_values(a), torch.full((SIZE,), 1.0)), f"a averaged with a revoked peer: {outcomes}"
    assert torch.equal(_values(b), torch.full((SIZE,), 3.0)), f"a revoked peer got the average: {outcomes}"
    refused = {k: v - before[k] for k, v in gate.refused_calls().items()}
    assert refused["join"] + refused["leader"] + refused["group"] > 0, refused


@pytest.fixture
def span_server(tiny_assets, tmp_path):
    server_dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    callers = [start_dht(visible_addresses(server_dht), ["/ip4/127.0.0.1/tcp/0"], [], None) for _ in range(2)]
    publish(server_dht, str(callers[0].peer_id), ttl=600)  # the second caller holds no token
    gate.admit_with(gate.AccessList(access_key(RUN), token_checker(RUN, OWNER_TAG), server_dht))
    servicer = ShardServicer(load_block_span(tiny_assets["model"], 0, 2), RUN, ServerLimits())
    p2p = RemoteExpertWorker.run_coroutine(server_dht.replicate_p2p())
    clients = [RemoteExpertWorker.run_coroutine(c.replicate_p2p()) for c in callers]
    try:
        RemoteExpertWorker.run_coroutine(serve_on(p2p, servicer))
        yield servicer, clients, server_dht
    finally:
        gate.admit_with(None)
        RemoteExpertWorker.run_coroutine(stop_serving(p2p, servicer))
        servicer.shutdown()
        for replica in (*clients, p2p):
            RemoteExpertWorker.run_coroutine(replica.shutdown())
        for dht in (*callers, server_dht):
            dht.shutdown()


def _forward(client: P2P, server, hidden: torch.Tensor) -> dict:
    request = wire.request([hidden], start=0, end=2, position_offset=0)
    call = client.call_protobuf_handler(server, f"{ShardServicer.__name__}.rpc_forward", request,
                                        runtime_pb2.ExpertResponse)  # fmt: skip
    reply = RemoteExpertWorker.run_coroutine(asyncio.wait_for(call, 30))
    meta = wire.metadata_of(reply, wire.INTERNAL)
    return {"meta": meta, "tensors": wire.tensors_of(reply) if "error" not in meta else None}


def test_a_shard_span_serves_only_callers_with_a_token(span_server):
    servicer, (member, outsider), server_dht = span_server
    hidden = torch.randn(1, 4, HIDDEN)
    before = gate.refused_calls()["shard"]
    answered = _forward(member, server_dht.peer_id, hidden)
    assert "error" not in answered["meta"] and answered["tensors"][0].shape == hidden.shape
    refused = _forward(outsider, server_dht.peer_id, hidden)
    assert refused["meta"]["kind"] == wire.FORBIDDEN, refused["meta"]
    assert "holds no valid access token" in refused["meta"]["error"]
    assert gate.refused_calls()["shard"] == before + 1
    failures = {
        sample.labels["kind"]: sample.value
        for metric in servicer.metrics.registry.collect()
        if metric.name == "potluck_shard_request_failures"
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
    assert failures.get(wire.FORBIDDEN) == 1, failures


def test_shard_announcements_of_servers_without_a_token_are_not_read(tmp_path):
    dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    try:
        listed = gate.AccessList(access_key(RUN), token_checker(RUN, OWNER_TAG), dht)
        gate.admit_with(listed)
        for name in ("member", "outsider"):
            P2P.generate_identity(str(tmp_path / name))
            tag = public_key_tag(read_identity(tmp_path / name))
            peer_id = peer_id_of_owner(tag)
            if name == "member":
                publish(dht, peer_id, ttl=600)
            announcement = ShardAnnouncement(run_id=RUN, peer_id=peer_id, throughput=1.0, state="online",
                                             version=SHARD_PROTOCOL_VERSION, announced_at=time.time(), start=0, end=1)  # fmt: skip
            dht.store(
                shards_key(RUN), subkey=tag, value=announcement.dict(), expiration_time=time.time() + 60
            )
        before = gate.refused_calls()["record"]
        read = read_shards(dht, RUN)
        assert [r.peer_id for r in read.records.values()] == [listed_id for listed_id in listed._expires]
        assert read.skipped["no_access_token"] == 1
        assert gate.refused_calls()["record"] == before + 1
    finally:
        gate.admit_with(None)
        dht.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_run_peers_of_a_private_run_train_together_and_leave_out_a_peer_without_a_token(
    make_spec, local_swarm, tmp_path
):
    owner = tmp_path / "owner.key"
    assert access_main(["keygen", "--out", str(owner)]) == 0
    steps, run = 6, "private-swarm"
    private = make_spec(run_id=run, max_global_steps=steps,
                        access={"private": True, "owner_key": owner.with_suffix(".pub").read_text()})  # fmt: skip
    members = local_swarm(private)
    tokens = {}
    for name in ("a", "b"):
        tokens[name] = tmp_path / f"{name}.token"
        assert access_main(["grant", "--owner-key", str(owner), "--run", run, "--peer-id",
                            peer_id_of(tmp_path / f"{name}.id"), "--out", str(tokens[name])]) == 0  # fmt: skip
    common = ["--min-peers", "2", "--access-token"]
    first, address = start_first(members, "a", [*common, str(tokens["a"]), "--save-dir", str(tmp_path / "a")],
                                 tmp_path)  # fmt: skip
    members.start_peer("b", [*common, str(tokens["b"]), "--save-dir", str(tmp_path / "b"),
                             "--identity-path", str(tmp_path / "b.id")], initial_peers=[address])  # fmt: skip
    # a modified peer that ignores the run's privacy: the same run, public to it
    outsider = local_swarm(make_spec(run_id=run, max_global_steps=steps))
    intruder = outsider.start_peer("x", ["--identity-path", str(tmp_path / "x.id")], initial_peers=[address])
    assert members.wait_all(timeout=300) == [0, 0], first.log()[-3000:]
    a = load_file(checkpoint_at(tmp_path / "a", steps) / "model.safetensors")
    b = load_file(checkpoint_at(tmp_path / "b", steps) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = first.log() + members.peers[1].log()
    outsider_id = peer_id_of(tmp_path / "x.id")
    assert f"peer {outsider_id}: it holds no valid access token" in logs, logs[-3000:]
    for peer in (first, members.peers[1]):
        assert peer.summary().rounds.succeeded > 0, peer.log()[-3000:]
    outsider.stop(grace=10)  # SIGTERM, then its summary
    assert intruder.summary() is not None and intruder.summary().rounds.succeeded == 0, intruder.log()[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_private_runs_span_server_answers_generate_only_with_a_token(make_spec, local_swarm, tmp_path):
    owner = tmp_path / "owner.key"
    assert access_main(["keygen", "--out", str(owner)]) == 0
    run = "private-spans"
    spec_path = make_spec(
        run_id=run, access={"private": True, "owner_key": owner.with_suffix(".pub").read_text()}
    )
    tokens = {}
    for name in ("server", "reader"):
        tokens[name] = tmp_path / f"{name}.token"
        assert access_main(["grant", "--owner-key", str(owner), "--run", run, "--peer-id",
                            peer_id_of(tmp_path / f"{name}.id"), "--out", str(tokens[name])]) == 0  # fmt: skip
    swarm = local_swarm(spec_path)
    server = swarm.start_peer("server", ["--role", "shard", "--blocks", "0:2", "--identity-path",
                                         str(tmp_path / "server.id"), "--access-token", str(tokens["server"])],
                              initial_peers=[])  # fmt: skip
    swarm.wait_for_event(server, "serving")
    spec = load_run_spec(spec_path)
    local_text = generate_text(spec, "7+5=", max_new_tokens=6).text

    def generate(*flags: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "potluck.tools.cli", "generate", "--run-spec", str(spec_path),
                   "--prompt", "7+5=", "--max-new-tokens", "6", "--remote",
                   "--initial-peers", server.join_address(), *flags]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    granted = generate(
        "--identity-path", str(tmp_path / "reader.id"), "--access-token", str(tokens["reader"])
    )
    assert granted.returncode == 0, granted.stderr[-2000:]
    assert granted.stdout.rstrip("\n") == local_text
    refused = generate()  # no token: refused up front, one line
    assert refused.returncode == 2 and "is private: give --access-token" in refused.stderr, refused.stderr[
        -2000:
    ]
    # a client that skips the check (a stranger's own code) is answered "forbidden" by the server itself
    stranger = generate_without_token(spec, server.join_address())
    assert "this peer holds no valid access token" in stranger, stranger
    assert "refused shard of peer" in server.log(), server.log()[-3000:]


def generate_without_token(spec, address: str) -> str:
    """What a client with no token gets from the server: the error ``generate_text`` raises, as text."""
    try:
        generate_text(spec.model_copy(update={"access": AccessSpec()}), "7+5=", 2, [address])
    except Exception as e:  # noqa: BLE001 (the refusal, whatever the client wraps it in)
        return str(e)
    return "answered"


def test_the_owner_renews_approved_peers_tokens_in_the_dht_and_a_removed_peer_is_out_when_its_last_expires(
    tmp_path, capsys
):
    owner_dht = start_dht(
        [], ["/ip4/127.0.0.1/tcp/0"], [], None, record_validators=record_validators(OWNER, (RUN,))
    )
    reader = start_dht(visible_addresses(owner_dht), ["/ip4/127.0.0.1/tcp/0"], [], None,
                       record_validators=record_validators(None, (RUN,)))  # fmt: skip
    try:
        approved = tmp_path / "approved.txt"
        ids = [peer_id_of(tmp_path / f"{name}.id") for name in ("kept", "revoked")]
        approved.write_text(f"# the run's volunteers\n{ids[0]}\n{ids[1]}  # until today\nnot-a-peer\n")
        ttl = 4.0
        assert publish_approved(owner_dht, OWNER, RUN, approved, ttl) == ids
        assert "approved.txt:4: 'not-a-peer' is not a peer id" in capsys.readouterr().err
        listed = gate.AccessList(
            access_key(RUN), token_checker(RUN, OWNER_TAG), reader
        )  # a peer's, elsewhere
        listed.read()
        assert all(listed.holds_token(i) for i in ids)
        approved.write_text(f"{ids[0]}\n")  # revoked: no longer renewed
        revoked_at = time.time()
        wait_until(lambda: not listed.holds_token(ids[1]), ttl + 3, "the revoked peer's last token to expire")
        assert time.time() - revoked_at <= ttl + 0.5
        assert publish_approved(owner_dht, OWNER, RUN, approved, ttl) == ids[:1]
        listed.read()
        assert listed.holds_token(ids[0]) and not listed.holds_token(ids[1])
    finally:
        reader.shutdown()
        owner_dht.shutdown()
