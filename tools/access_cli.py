"""``potluck access``: the owner's side of a private run (``protocols/access.py``, docs/security.md).

    potluck access keygen --out owner.key            # owner.key (keep it) and owner.pub (access.owner_key)
    potluck access peer-id --identity-path id.key    # a peer's id, its identity made if missing
    potluck access grant --owner-key owner.key --run RUN --peer-id ID --ttl 3600 --out token

Revoke a peer by not renewing its token: it is out once the token expires. Renew a peer's tokens by writing new
ones into its ``--access-token`` file (a cron job, or a loop of ``grant``): the peer reads the file again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import multihash
from hivemind.p2p import PeerID

from potluck.hivemind_ext.keys import IdentityError, read_identity
from potluck.protocols.access import TokenError, issue_token
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
    except (ValueError, TokenError, IdentityError) as e:
        print(f"potluck access: {e}", file=sys.stderr)
        return 2
    return 0
