"""Access tokens of private runs, without a swarm: what a token admits, what is refused and why, in one line
(``protocols/access.py``, ``hivemind_ext/access.py``'s list, ``peer/net/access.py``'s start-up check, ``potluck
access``). The swarm's side: tests/test_private_runs.py."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon import P2P
from hivemind.utils.crypto import RSAPrivateKey

from potluck.hivemind_ext import access as gate
from potluck.hivemind_ext.keys import read_identity
from potluck.peer.net.access import AccessTokenError, read_own_token
from potluck.protocols.access import (
    TokenError,
    access_key,
    check_own_token,
    issue_token,
    owner_public_key,
    read_token,
    token_checker,
)
from potluck.protocols.records import public_key_tag
from potluck.protocols.runspec import RunSpecError, parse_run_spec
from potluck.tools.access_cli import main as access_main

pytestmark = pytest.mark.unit

RUN = "private-run"
OWNER = RSAPrivateKey()
OWNER_TAG = public_key_tag(OWNER).decode()
PEER = "QmUAoHsB4Mhrhwg5NQvvpHeX7H32DCVdQqgWSbLAR43o3o"


def test_a_token_admits_the_peer_it_names_to_its_run_until_it_expires():
    token = read_token(issue_token(OWNER, RUN, PEER, ttl=60), owner_public_key(OWNER_TAG))
    assert (token.run_id, token.peer_id) == (RUN, PEER)
    check_own_token(token, RUN, PEER)
    assert token.valid_at(time.time() + 59) and not token.valid_at(time.time() + 61)
    with pytest.raises(TokenError, match="for run 'private-run', not 'other'"):
        check_own_token(token, "other", PEER)
    with pytest.raises(TokenError, match=f"for peer {PEER}, and this peer's identity is Qmx"):
        check_own_token(token, RUN, "Qmx")
    with pytest.raises(TokenError, match="expired 40 s ago"):
        check_own_token(token, RUN, PEER, now=token.expires_at + 40)


def test_a_forged_altered_or_malformed_token_is_refused_naming_why():
    owner = owner_public_key(OWNER_TAG)
    forged = issue_token(RSAPrivateKey(), RUN, PEER, ttl=60)
    with pytest.raises(TokenError, match="not signed by the run's owner key"):
        read_token(forged, owner)
    prefix, payload, signature = issue_token(OWNER, RUN, PEER, ttl=60).split(".")
    other_payload = issue_token(OWNER, RUN, "QmOther", ttl=60).split(".")[1]
    with pytest.raises(TokenError, match="not signed by the run's owner key"):
        read_token(
            ".".join((prefix, other_payload, signature)), owner
        )  # another peer's payload, this signature
    for text, why in (("hello", "not a Potluck access token"), ("x" * 5000, "more than a token's"),
                      (f"{prefix}.!!!.{signature}", "not base64url"), (b"\xff\xfe", "not text")):  # fmt: skip
        with pytest.raises(TokenError, match=why):
            read_token(text, owner)
    with pytest.raises(TokenError, match="ttl"):
        issue_token(OWNER, RUN, PEER, ttl=0)


def test_the_access_list_admits_only_valid_tokens_of_its_run_and_counts_the_rest():
    now = time.time()
    values = {
        b"a": issue_token(OWNER, RUN, "QmA", ttl=60),
        b"b": issue_token(OWNER, RUN, "QmB", ttl=60, now=now - 120),  # expired
        b"c": issue_token(OWNER, "another-run", "QmC", ttl=60),
        b"d": issue_token(RSAPrivateKey(), RUN, "QmD", ttl=60),  # forged
        b"e": {"not": "a token"},
    }
    found = SimpleNamespace(value={k: SimpleNamespace(value=v) for k, v in values.items()})
    listed = gate.AccessList(access_key(RUN), token_checker(RUN, OWNER_TAG), dht=None)
    listed.take(found)
    assert [p for p in ("QmA", "QmB", "QmC", "QmD") if listed.holds_token(p)] == ["QmA"]
    assert listed.skipped == 4
    clock = [now + 61]  # the same list a minute on: QmA's token has expired
    later = gate.AccessList(access_key(RUN), token_checker(RUN, OWNER_TAG), dht=None, clock=lambda: clock[0])
    later._expires = dict(listed._expires)
    assert not later.holds_token("QmA")


def test_progress_records_of_peers_without_a_token_are_left_out_and_counted_once(tmp_path):
    tags = {}
    for name in ("member", "outsider"):
        P2P.generate_identity(str(tmp_path / name))
        key = read_identity(tmp_path / name)
        tags[name] = public_key_tag(key)
        tags[name + "_id"] = PeerID.from_identity((tmp_path / name).read_bytes()).to_base58()
    listed = gate.AccessList(access_key(RUN), token_checker(RUN, OWNER_TAG), dht=None)
    token = issue_token(OWNER, RUN, tags["member_id"], ttl=60)
    listed.take(SimpleNamespace(value={b"x": SimpleNamespace(value=token)}))
    records = {tags["member"]: "its progress", tags["outsider"]: "posing", b"unsigned": "?"}
    before = gate.refused_calls()["record"]
    gate.admit_with(listed)
    try:
        assert gate.admitted_records(records) == {tags["member"]: "its progress"}
        assert gate.admitted_records(records) == {tags["member"]: "its progress"}
    finally:
        gate.admit_with(None)
    assert gate.refused_calls()["record"] - before == 2  # the outsider and the unsigned record, once each
    assert gate.admitted_records(records) == records  # a public run takes every record


def _spec(**access) -> dict:
    return {"run_id": RUN, "model": {"name_or_path": "m"}, "data": {"path": "d"},
            "batch": {"target_batch_size": 1, "per_peer_batch_size": 1}, "access": access}  # fmt: skip


def test_a_private_spec_names_a_valid_owner_key():
    assert parse_run_spec(_spec(private=True, owner_key=OWNER_TAG)).access.private
    with pytest.raises(RunSpecError, match="access.owner_key.*required when private is true"):
        parse_run_spec(_spec(private=True))
    with pytest.raises(RunSpecError, match="access.owner_key.*not an RSA public key"):
        parse_run_spec(_spec(private=True, owner_key="ssh-rsa nonsense"))


def test_a_peer_checks_its_own_token_before_anything_loads(tmp_path):
    spec = parse_run_spec(_spec(private=True, owner_key=OWNER_TAG))
    identity = tmp_path / "id.key"
    P2P.generate_identity(str(identity))
    peer_id = PeerID.from_identity(identity.read_bytes()).to_base58()
    token = tmp_path / "token"
    token.write_text(issue_token(OWNER, RUN, peer_id, ttl=60))
    assert read_own_token(spec, token, identity).peer_id == peer_id
    assert read_own_token(parse_run_spec(_spec()), None, None) is None  # a public run needs none
    cases = [
        (None, identity, "run 'private-run' is private: give --access-token FILE"),
        (token, None, "give --identity-path"),
        (tmp_path / "missing", identity, "cannot read it"),
    ]
    for path, ident, message in cases:
        with pytest.raises(AccessTokenError, match=message):
            read_own_token(spec, path, ident)
    other = tmp_path / "other.key"
    P2P.generate_identity(str(other))
    with pytest.raises(AccessTokenError, match=f"--access-token {token}: it is for peer {peer_id}"):
        read_own_token(spec, token, other)
    token.write_text(issue_token(OWNER, RUN, peer_id, ttl=60, now=time.time() - 3600))
    with pytest.raises(AccessTokenError, match="expired"):
        read_own_token(spec, token, identity)


def test_potluck_access_makes_keys_peer_ids_and_tokens(tmp_path, capsys):
    owner, identity, token = tmp_path / "owner.key", tmp_path / "id.key", tmp_path / "token"
    assert access_main(["keygen", "--out", str(owner)]) == 0
    spec = parse_run_spec(_spec(private=True, owner_key=Path(str(owner.with_suffix(".pub"))).read_text()))
    assert access_main(["peer-id", "--identity-path", str(identity)]) == 0
    peer_id = capsys.readouterr().out.split()[-1]
    assert access_main(["grant", "--owner-key", str(owner), "--run", RUN, "--peer-id", peer_id,
                        "--ttl", "60", "--out", str(token)]) == 0  # fmt: skip
    assert read_own_token(spec, token, identity).peer_id == peer_id
    capsys.readouterr()
    assert access_main(["keygen", "--out", str(owner)]) == 2  # never overwrites the key its tokens depend on
    assert access_main(["grant", "--owner-key", str(owner), "--run", RUN, "--peer-id", "xx"]) == 2
    assert (
        access_main(["grant", "--owner-key", str(tmp_path / "none"), "--run", RUN, "--peer-id", peer_id]) == 2
    )
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("potluck access: ") for line in errors), errors
