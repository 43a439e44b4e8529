"""``potluck access``: the owner's side of a private run (``protocols/access.py``, docs/security.md).

    potluck access keygen --out owner.key            # owner.key (keep it) and owner.pub (access.owner_key)
    potluck access peer-id --identity-path id.key    # a peer's id, its identity made if missing
    potluck access grant --owner-key owner.key --run RUN --peer-id ID --ttl 3600 --out token
    potluck access serve --owner-key owner.key --run RUN --approved peers.txt --initial-peers MADDR

A peer joins with its first token (``grant``). ``serve`` renews the tokens of the peers listed in ``--approved``
(one peer id per line) by publishing fresh ones in the run's DHT, where every peer reads them; remove a line to
revoke that peer: it is out once its last token expires (``--ttl``). Without ``serve``, renew a peer by writing a
new token into its ``--access-token`` file, which the peer reads again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import multihash
from hivemind.p2p import PeerID

from potluck.hivemind_ext.keys import IdentityError, read_identity
from potluck.protocols.access import TokenError, access_key, issue_token
from potluck.protocols.records import load_or_create_key, public_key_tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="potluck access", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser(
        "keygen", help="a new owner key; its .pub goes into the spec's access.owner_key"
    )
    keygen.add_argument(
        "--out", type=Path, required=True, help="the private key's file (the .pub is written beside)"
    )
    ident = commands.add_parser("peer-id", help="the peer id of an identity file (made when missing)")
    ident.add_argument("--identity-path", type=Path, required=True)
    grant = commands.add_parser("grant", help="a token admitting one peer to a private run")
    grant.add_argument("--owner-key", type=Path, required=True, help="the owner's private key (keygen --out)")
    grant.add_argument("--run", required=True, help="the run id")
    grant.add_argument("--peer-id", required=True, help="the peer's id (potluck access peer-id)")
    grant.add_argument("--ttl", type=float, default=3600.0, help="seconds the token is valid (default 3600)")
    grant.add_argument("--out", type=Path, default=None, help="write the token here (default: print it)")
    serve = commands.add_parser(
        "serve", help="keep publishing fresh tokens for the approved peers in the DHT"
    )
    serve.add_argument("--owner-key", type=Path, required=True)
    serve.add_argument("--run", required=True)
    serve.add_argument(
        "--approved", type=Path, required=True, help="peer ids, one per line (# comments); read every tick"
    )
    serve.add_argument(
        "--ttl", type=float, default=600.0, help="seconds each token is valid: how long a revocation takes"
    )
    serve.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="a peer of the run")
    serve.add_argument("--host-maddrs", nargs="*", default=["/ip4/0.0.0.0/tcp/0"], metavar="MADDR")
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            if args.out.exists():
                raise ValueError(f"--out {args.out}: exists; a new key would lock out every token it signed")
            key = load_or_create_key(args.out)
            pub = args.out.with_suffix(".pub")
            pub.write_bytes(public_key_tag(key) + b"\n")
            print(f"owner key: {args.out} (keep it private)\naccess.owner_key: {pub.read_text().strip()}")
        elif args.command == "peer-id":
            if not args.identity_path.exists():
                from hivemind.p2p.p2p_daemon import P2P

                args.identity_path.parent.mkdir(parents=True, exist_ok=True)
                P2P.generate_identity(str(args.identity_path))
            read_identity(args.identity_path)  # an RSA identity, as a peer needs
            print(PeerID.from_identity(args.identity_path.read_bytes()).to_base58())
        elif args.command == "grant":
            if not args.owner_key.exists():
                raise ValueError(
                    f"--owner-key {args.owner_key}: no such file (potluck access keygen --out it)"
                )
            try:
                multihash.decode(PeerID.from_base58(args.peer_id).to_bytes())
            except ValueError:
                raise ValueError(
                    f"--peer-id {args.peer_id!r}: not a peer id (potluck access peer-id)"
                ) from None
            token = issue_token(load_or_create_key(args.owner_key), args.run, args.peer_id, args.ttl)
            if args.out is None:
                print(token)
            else:
                args.out.write_text(token + "\n")
        elif args.command == "serve":
            return serve_tokens(args)
    except (ValueError, TokenError, IdentityError, ConnectionError) as e:
        print(f"potluck access: {e}", file=sys.stderr)
        return 2
    return 0


def approved_peers(path: Path) -> tuple[list[str], list[str]]:
    """The peer ids listed in ``path`` (one per line; blank lines and ``#`` comments skipped), and the lines that are
    not peer ids (``path:LINE: ...``)."""
    peers, bad = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            multihash.decode(PeerID.from_base58(text).to_bytes())
        except ValueError:
            bad.append(f"{path}:{number}: {text!r} is not a peer id")
            continue
        peers.append(text)
    return peers, bad


def publish_approved(dht, owner, run_id: str, approved: Path, ttl: float) -> list[str]:
    """Publish a fresh token for every peer listed in ``approved`` under the run's access key, signed by ``owner``
    (the subkey: the peer id and the owner's key tag); returns the peer ids published. A line that is no peer id is
    logged and skipped."""
    from hivemind.utils.timed_storage import get_dht_time

    peers, bad = approved_peers(approved)
    for line in bad:
        print(f"potluck access serve: {line}; skipped", file=sys.stderr)
    tag = public_key_tag(owner)
    for peer_id in peers:
        dht.store(access_key(run_id), subkey=peer_id.encode() + tag, value=issue_token(owner, run_id, peer_id, ttl),
                  expiration_time=get_dht_time() + ttl)  # fmt: skip
    return peers


def serve_tokens(args: argparse.Namespace) -> int:
    """``potluck access serve``: a DHT node of the run that publishes the approved peers' tokens every third of
    their life, until Ctrl-C."""
    import signal
    import threading

    from potluck.hivemind_ext.dht import start_dht
    from potluck.peer.preflight import check_addresses
    from potluck.protocols.records import record_validators

    if not args.owner_key.exists():
        raise ValueError(f"--owner-key {args.owner_key}: no such file (potluck access keygen --out it)")
    if not args.approved.exists():
        raise ValueError(f"--approved {args.approved}: no such file (one peer id per line)")
    check_addresses(args.initial_peers, args.host_maddrs)
    owner = load_or_create_key(args.owner_key)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    dht = start_dht(args.initial_peers, args.host_maddrs, [], None,
                    record_validators=record_validators(owner, (args.run,)))  # fmt: skip
    try:
        before: set[str] = set()
        while not stop.is_set():
            now = set(publish_approved(dht, owner, args.run, args.approved, args.ttl))
            revoked = before - now
            print(f"potluck access serve: {len(now)} tokens of run {args.run!r} published for {args.ttl:g} s"
                  + (f"; no longer renewed: {', '.join(sorted(revoked))}" if revoked else ""), flush=True)  # fmt: skip
            before = now
            stop.wait(args.ttl / 3)
    finally:
        dht.shutdown()
    return 0
