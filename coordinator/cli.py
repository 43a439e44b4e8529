"""``run-coordinator``: registry + bootstrap DHT node + announcer/collector + gRPC API + dashboard."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from potluck.coordinator.collector import Collector, SwarmMetrics
from potluck.coordinator.store import RunStore
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
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    grpc_server, grpc_port = start_grpc_server(service, args.host, args.grpc_port)
    web_server, http_port = start_web_server(store, registry, args.host, args.http_port)
    collector.start()

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"run-coordinator: gRPC API on {args.host}:{grpc_port}", file=sys.stderr)
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
