"""``run-peer``: parse → build → train → shut down."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

from potluck.peer.data import DatasetFormatError
from potluck.peer.device import DeviceError, resolve_device
from potluck.peer.runner import PeerOptions, run_peer
from potluck.protocols.runspec import RunSpecError, load_run_spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run-peer", description="Join a Potluck swarm and train the run together."
    )
    p.add_argument("--run-spec", type=Path, required=True, help="YAML run spec (see docs/architecture.md)")
    p.add_argument(
        "--initial-peers",
        nargs="*",
        default=[],
        metavar="MADDR",
        help="multiaddrs of peers already in the swarm; none starts a new swarm",
    )
    p.add_argument("--gpu", type=int, default=None, metavar="N", help="train on CUDA device N (default: CPU)")
    p.add_argument(
        "--host-maddrs",
        nargs="+",
        default=["/ip4/0.0.0.0/tcp/0"],
        metavar="MADDR",
        help="multiaddrs to listen on (default: all interfaces, a free TCP port)",
    )
    p.add_argument(
        "--announce-maddrs",
        nargs="*",
        default=[],
        metavar="MADDR",
        help="multiaddrs to tell others (e.g. your public address behind port forwarding)",
    )
    p.add_argument(
        "--identity-path",
        type=Path,
        default=None,
        help="private key file; keeps the peer id (and this peer's data order) across restarts",
    )
    p.add_argument(
        "--client-mode",
        action="store_true",
        help="do not accept incoming connections (for peers behind NAT/firewalls)",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for the metrics endpoint")
    p.add_argument("--save-dir", type=Path, default=None, help="write checkpoints here and resume from them")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop at this global step (default: the spec's)"
    )
    p.add_argument(
        "--min-peers",
        type=int,
        default=1,
        help="wait until this many peers (this one included) joined the run before training",
    )
    p.add_argument("--min-peers-timeout", type=float, default=120.0, help="seconds to wait for --min-peers")
    p.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("-v", "--verbose", action="store_true", help="show hivemind's own log messages")
    return p


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_root_logger")
    logging.getLogger("hivemind").setLevel(logging.INFO if verbose else logging.WARNING)
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.gpu)
        spec = load_run_spec(args.run_spec)
    except (DeviceError, RunSpecError) as e:
        print(f"run-peer: {e}", file=sys.stderr)
        return 2
    configure_logging(args.verbose)
    options = PeerOptions(
        initial_peers=args.initial_peers,
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs,
        identity_path=args.identity_path,
        client_mode=args.client_mode,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        save_dir=args.save_dir,
        max_steps=args.max_steps,
        min_peers=args.min_peers,
        min_peers_timeout=args.min_peers_timeout,
        progress_interval=args.progress_interval,
    )
    try:
        result = run_peer(spec, options, device, stop=threading.Event())
    except (DatasetFormatError, FileNotFoundError, OSError) as e:
        print(f"run-peer: {e}", file=sys.stderr)
        return 2
    why = "stopped by signal" if result.stopped_by_signal else "reached the last global step"
    print(
        f"run-peer: {why}: global step {result.global_step}, {result.local_steps} local steps, "
        f"{result.samples} samples, last loss {result.last_loss:.4f}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
