"""``run-coordinator``: registry + bootstrap DHT node + announcer/collector + gRPC API + dashboard.

Security (docs/operations.md, "An authenticated coordinator"): ``--tls-cert``/``--tls-key`` or
``--tls-self-signed DIR`` serve gRPC over TLS only; ``--operator-token-file`` (or the token
``--tls-self-signed`` writes) guards publishing and status changes; ``--http-auth`` puts the dashboard
and ``/metrics`` behind the same token.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from potluck.coordinator.auth import OperatorGate, create_operator_token
from potluck.coordinator.collector import Collector, SwarmMetrics
from potluck.coordinator.store import RunStore
from potluck.coordinator.tls import ServerCertificate, load_certificate, self_signed_certificate
from potluck.protocols.coordinator_access import AccessError, read_operator_token
from potluck.protocols.records import load_or_create_key, public_key_tag, record_validators

REMEMBERED_JOIN_TIMEOUT = 10.0
"""Seconds a restarted coordinator tries the peers it remembers before it starts a new swarm."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run-coordinator", description="Publish runs, bootstrap peers, collect metrics."
    )
    p.add_argument("--db", type=Path, default=Path("potluck.db"), help="SQLite database (created if missing)")
    p.add_argument(
        "--key-path",
        type=Path,
        default=None,
        help="the coordinator's RSA signing key (default: next to --db); created on first start",
    )
    p.add_argument("--host", default="127.0.0.1", help="address for the gRPC API and the dashboard")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument(
        "--http-port", type=int, default=8080, help="dashboard (/) and Prometheus metrics (/metrics)"
    )
    p.add_argument("--dht-host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/31337"], metavar="MADDR")
    p.add_argument(
        "--announce-maddrs",
        nargs="*",
        default=[],
        metavar="MADDR",
        help="DHT addresses to give peers (e.g. the public address)",
    )
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="join an existing DHT")
    p.add_argument("--identity-path", type=Path, default=None, help="stable libp2p peer id across restarts")
    p.add_argument("--collect-interval", type=float, default=5.0, help="seconds between DHT reads")
    tls = p.add_argument_group("security (default: plaintext and open, for loopback or a private network)")
    tls.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="serve gRPC over TLS only: this certificate (with --tls-key)",
    )
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's unencrypted private key")
    tls.add_argument(
        "--tls-self-signed",
        type=Path,
        metavar="DIR",
        help="serve TLS with DIR/coordinator.crt and .key, written on first start for the names "
        "--host serves; clients trust DIR/coordinator.crt (--tls-ca). Without "
        "--operator-token-file it also writes and uses DIR/operator.token",
    )
    tls.add_argument(
        "--operator-token-file",
        type=Path,
        metavar="FILE",
        help="publishing and status changes need this token (authorization: Bearer); reads stay open",
    )
    tls.add_argument(
        "--http-auth",
        action="store_true",
        help="the dashboard, its API and /metrics need the operator token too (Bearer, or HTTP "
        "Basic with it as password); /healthz stays open",
    )
    return p  # fmt: skip


@dataclass(frozen=True)
class Security:
    certificate: ServerCertificate | None
    token: str | None
    token_path: Path | None


def security_from_args(args: argparse.Namespace) -> Security:
    """Check the security flags and read their files (writing the self-signed ones); one-line errors."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise AccessError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_self_signed is not None:
        raise AccessError("--tls-self-signed and --tls-cert/--tls-key exclude each other: give one")
    certificate = None
    if args.tls_cert is not None:
        certificate = load_certificate(args.tls_cert, args.tls_key)
    token_path, token = args.operator_token_file, None
    if token_path is not None:
        token = read_operator_token(token_path)
    if args.tls_self_signed is not None:
        try:
            certificate = self_signed_certificate(args.tls_self_signed, args.host)
            if token_path is None:
                token_path = args.tls_self_signed / "operator.token"
                token = create_operator_token(token_path)
        except OSError as e:
            raise AccessError(
                f"--tls-self-signed {args.tls_self_signed}: cannot write there ({e.strerror})"
            ) from None
    if args.http_auth and token is None:
        raise AccessError("--http-auth needs an operator token: --operator-token-file or --tls-self-signed")
    return Security(certificate, token, token_path)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def print_security(args: argparse.Namespace, security: Security) -> None:
    """Where clients find what they need, and a warning where the API is open beyond this machine."""
    if security.certificate is not None:
        names = ", ".join(security.certificate.names) or "its subject"
        print(f"run-coordinator: TLS on; clients trust {security.certificate.cert_path} (--tls-ca); "
              f"valid for {names}", file=sys.stderr)  # fmt: skip
    if security.token_path is not None:
        print(f"run-coordinator: publishing and status changes need the token in {security.token_path} "
              "(--operator-token-file)", file=sys.stderr)  # fmt: skip
    if _is_loopback(args.host):
        return
    if security.token is None:
        print(f"run-coordinator: WARNING: anyone who reaches {args.host}:{args.grpc_port} can publish runs and "
              "change their status: give --operator-token-file and TLS", file=sys.stderr)  # fmt: skip
    elif security.certificate is None:
        print(f"run-coordinator: WARNING: the operator token crosses the network in plaintext to "
              f"{args.host}: add TLS (--tls-cert/--tls-key or --tls-self-signed)", file=sys.stderr)  # fmt: skip
    if (
        args.http_auth
    ):  # the dashboard is plain HTTP, TLS or not: its visitors and scrapes send the token as is
        print(f"run-coordinator: WARNING: --http-auth asks for the operator token over plain HTTP on "
              f"{args.host}:{args.http_port}: whoever can watch that traffic can publish runs; keep the dashboard "
              "on a network you trust or behind an HTTPS proxy", file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # before anything heavy loads: a bad file is one line, at once
        security = security_from_args(args)
    except AccessError as e:
        print(f"run-coordinator: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_root_logger")
    logging.getLogger("hivemind").setLevel(logging.WARNING)

    from potluck.coordinator.grpc_service import CoordinatorService, start_grpc_server
    from potluck.coordinator.web import start_web_server, stop_web_server
    from potluck.hivemind_ext.dht import JOIN_TIMEOUT, SwarmJoinError, start_dht, visible_addresses

    store = RunStore(args.db)
    key = load_or_create_key(args.key_path or args.db.with_suffix(".key"))
    key_tag = public_key_tag(key)
    (args.key_path or args.db.with_suffix(".key")).with_suffix(".pub").write_bytes(key_tag)
    runs = tuple(r.run_id for r in store.list_runs())
    # after a restart, rejoin the swarm through the peers that reported most recently
    remembered = store.recent_peer_addresses()

    def dht_through(initial: list[str], join_timeout: float):
        return start_dht(
            initial, args.dht_host_maddrs, args.announce_maddrs, args.identity_path,
            record_validators=record_validators(key, runs), ensure_bootstrap_success=not remembered,
            join_timeout=join_timeout,
        )  # fmt: skip

    try:
        # peers it only remembers may all be gone (the swarm ended while it was down): try them briefly
        briefly = remembered and not args.initial_peers
        dht = dht_through(
            [*args.initial_peers, *remembered], REMEMBERED_JOIN_TIMEOUT if briefly else JOIN_TIMEOUT
        )
    except SwarmJoinError:
        if args.initial_peers:
            raise
        print(
            "run-coordinator: none of the peers it remembered answered: starting a new swarm", file=sys.stderr
        )
        dht = dht_through([], JOIN_TIMEOUT)
    registry = CollectorRegistry()
    collector = Collector(dht, store, key_tag, SwarmMetrics(registry), interval=args.collect_interval)
    service = CoordinatorService(
        store, lambda: visible_addresses(dht), key_tag, on_run_changed=collector.announce
    )
    gate = OperatorGate(security.token, registry) if security.token is not None else None
    key_pair = (security.certificate.cert_pem, security.certificate.key_pem) if security.certificate else None
    grpc_server, grpc_port = start_grpc_server(
        service, args.host, args.grpc_port, tls_key_pair=key_pair, operator_gate=gate
    )
    web_server, http_port = start_web_server(
        store, registry, args.host, args.http_port, operator_gate=gate if args.http_auth else None
    )
    collector.start()

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"run-coordinator: gRPC API on {args.host}:{grpc_port}", file=sys.stderr)
    print_security(args, security)
    print(
        f"run-coordinator: dashboard on http://{args.host}:{http_port}/ (metrics: /metrics)", file=sys.stderr
    )
    for address in visible_addresses(dht):
        print(f"run-coordinator: DHT bootstrap address {address}", file=sys.stderr)
    print(f"run-coordinator: runs are signed by {key_tag.decode()[:40]}...", file=sys.stderr, flush=True)
    try:
        stop.wait()
    finally:
        collector.stop()
        grpc_server.stop(grace=2)
        stop_web_server(web_server)
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
