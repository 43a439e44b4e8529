"""``run-peer``: parse → build → train → shut down."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

from potluck.peer.device import DeviceError, resolve_device
from potluck.peer.net.discovery import DiscoveryError, find_run_in_dht, join_via_coordinator, read_trusted_key
from potluck.peer.preflight import INPUT_ERRORS, check_addresses, check_identity, check_run_inputs
from potluck.peer.results import PeerResults
from potluck.peer.roles.trainer import PeerOptions, run_peer, start_peer_dht
from potluck.peer.training.loop import NonFiniteLossError
from potluck.protocols.coordinator_access import AccessError, access_from_args, add_access_arguments
from potluck.protocols.runspec import RunSpec, load_run_spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run-peer", description="Join a Potluck swarm and train the run together."
    )
    source = p.add_argument_group("which run (one of)")
    source.add_argument("--run-spec", type=Path, help="a YAML run spec file (see protocols/runspec.py)")
    source.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="ask this coordinator for the run spec and bootstrap peers (gRPC)",
    )
    source.add_argument(
        "--run",
        metavar="RUN_ID",
        help="which run: with --coordinator (default: its newest active run), or with "
        "--initial-peers and --coordinator-key (read from the DHT)",
    )
    source.add_argument(
        "--coordinator-key",
        metavar="KEY_OR_FILE",
        help="the coordinator's '[owner:...]' public key (or a file with it): only runs "
        "announced under it are accepted, and the run's status there (paused, finished) is obeyed "
        "(with --coordinator: the key it hands out)",
    )
    add_access_arguments(source, prefix="coordinator-", operator=False)
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
        "--access-token",
        type=Path,
        default=None,
        metavar="FILE",
        help="a private run's access token for this peer's identity (potluck access grant); read again as it is "
        "renewed",
    )
    p.add_argument(
        "--client-mode",
        action="store_true",
        help="do not accept incoming connections (for peers behind NAT/firewalls)",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for the metrics endpoint")
    p.add_argument(
        "--save-dir",
        type=Path,
        default=None,
        help="write checkpoints here and resume from them (--role shard: the span's LoRA adapter; --role experts: "
        "the experts)",
    )
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
    p.add_argument(
        "--join-timeout",
        type=float,
        default=PeerOptions.join_timeout,
        help="seconds to keep trying to reach --initial-peers before giving up",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        metavar="PATH",
        help="write what this peer does as JSON Lines here (events, then a summary line; see peer/results.py)",
    )
    p.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("-v", "--verbose", action="store_true", help="show hivemind's own log messages")
    shard = p.add_argument_group("roles: layer shards (peer/shard/)")
    shard.add_argument(
        "--role",
        choices=["trainer", "shard", "client", "experts"],
        default="trainer",
        help="trainer (default): hold the whole model and train it data-parallel; shard: serve a span "
        "of its blocks to clients (a lora run trains its adapter on the servers); client: keep "
        "embeddings and head, train the run's prompt_tuning adapter through shard servers; experts: serve and "
        "train --experts of the run's mixture-of-experts model",
    )
    shard.add_argument(
        "--blocks",
        metavar="START:END",
        help="--role shard: serve blocks START..END-1 (default: the ones the swarm covers worst)",
    )
    shard.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="--role shard without --blocks: how many blocks to serve (default: half the model)",
    )
    shard.add_argument(
        "--experts",
        metavar="LIST",
        help="--role experts: which experts, comma-separated: E or A-B (those of every MoE layer), L:E or L:A-B "
        "(of layer L); e.g. 0-3 or 0:0-1,1:2-3",
    )
    return p


class _ShutdownNoiseFilter(logging.Filter):
    """Drops the tracebacks hivemind's child processes log while they are torn down together
    (a pipe to an averager that already exited, a pending task at interpreter exit). They are
    harmless and look like crashes to a volunteer; ``--verbose`` shows them."""

    _EXCEPTIONS = (ConnectionResetError, FileNotFoundError, BrokenPipeError, EOFError)
    _MESSAGES = ("Task was destroyed but it is pending", "did not shut down within the grace period")

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("hivemind", "asyncio")):
            return True
        if record.exc_info and isinstance(record.exc_info[1], self._EXCEPTIONS):
            return False
        return not any(m in record.getMessage() for m in self._MESSAGES)


class _FailedRoundFilter(logging.Filter):
    """Makes hivemind's report of a round that found no group, or whose all-reduce broke, one WARNING line: it
    logs it as an ERROR with a traceback through its own matchmaking code, while Potluck counts the round as failed
    and goes on (the strategy logs what it does next). A traceback reads as a crash to a volunteer and said
    nothing more; ``--verbose`` keeps it."""

    _ONE_LINE = (
        "AllreduceException",
        "MatchmakingException",
    )  # hivemind.averaging's; matched by name, no import

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name.startswith("hivemind")
            and record.exc_info
            and type(record.exc_info[1]).__name__ in self._ONE_LINE
        ):
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


def quiet_log_filters() -> list[logging.Filter]:
    """The filters on ``run-peer``'s log handlers unless ``--verbose``."""
    return [_ShutdownNoiseFilter(), _FailedRoundFilter()]


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_root_logger")
    logging.getLogger("hivemind").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # set before the DHT and averagers fork, so their handlers inherit it
        for handler in logging.getLogger().handlers:
            for noise in quiet_log_filters():
                handler.addFilter(noise)
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def user_error(message: object, results: PeerResults, status: int = 2) -> int:
    """One line for the user, the same reason in the summary; exit status 2 (bad input), or ``status`` (1: the
    run failed, e.g. a NaN loss)."""
    print(f"run-peer: {message}", file=sys.stderr)
    results.failed(message if isinstance(message, BaseException) else str(message))
    return status


def run_shard_role(
    args: argparse.Namespace, spec: RunSpec | None, options: PeerOptions, device, results: PeerResults
) -> int:
    """``--role shard`` serves blocks and ``--role experts`` experts until stopped; ``--role client`` trains through
    the servers."""
    if spec is None:
        return user_error(f"--role {args.role} needs --run-spec or --coordinator", results)
    # a client also reports, in one line, a missing route or failover giving up (RuntimeErrors)
    user_errors = (
        (ValueError, OSError) if args.role in ("shard", "experts") else (ValueError, OSError, RuntimeError)
    )
    try:
        if args.role == "experts":
            from potluck.peer.roles.expert_server import serve_experts

            if not args.experts:
                return user_error("--role experts needs --experts (e.g. --experts 0-3)", results)
            serve_experts(spec, options, threading.Event(), args.experts, device=device, results=results)
            return 0
        if args.role == "shard":
            from potluck.peer.roles.shard_server import parse_blocks, serve_shard

            blocks = parse_blocks(args.blocks) if args.blocks else None
            serve_shard(
                spec, options, threading.Event(), blocks, args.num_blocks, device=device, results=results
            )
            return 0
        from potluck.peer.roles.shard_client import train_through_shards

        result = train_through_shards(spec, options, threading.Event(), results=results, device=device)
    except user_errors as e:
        return user_error(e, results)
    except NonFiniteLossError as e:
        return user_error(e, results, status=1)
    print(f"run-peer: trained through shards: global step {result.global_step}, "
          f"last loss {result.last_loss:.4f}", file=sys.stderr)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with PeerResults(args.results, role=args.role) as results:  # the summary is written however we leave
        return run_role(args, results)


def run_role(args: argparse.Namespace, results: PeerResults) -> int:
    if not (args.run_spec or args.coordinator or (args.run and args.coordinator_key and args.initial_peers)):
        return user_error("say which run: --run-spec FILE, --coordinator HOST:PORT, or --initial-peers "
                          "with --run and --coordinator-key", results)  # fmt: skip
    try:
        device = resolve_device(args.gpu)
        spec = load_run_spec(args.run_spec) if args.run_spec else None
        check_addresses(args.initial_peers, args.host_maddrs, args.announce_maddrs)
        check_identity(args.identity_path)
        coordinator_key = read_trusted_key(args.coordinator_key) if args.coordinator_key else None
        coordinator_access = access_from_args(args, prefix="coordinator-")
    except (DeviceError, DiscoveryError, AccessError, *INPUT_ERRORS) as e:
        return user_error(e, results)
    if args.save_dir is not None:
        # before anything heavy: it was found out at the first checkpoint, after loading and joining
        try:
            args.save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return user_error(f"--save-dir {args.save_dir}: cannot create it ({e.strerror})", results)
    if spec is not None:
        try:  # the models and data on this machine, before any of them loads (peer/preflight.py)
            check_run_inputs(spec, args.role, args.save_dir, args.access_token, args.identity_path)
        except INPUT_ERRORS as e:
            return user_error(e, results)
        results.mark("inputs_checked")
    configure_logging(args.verbose)
    initial_peers = list(args.initial_peers)
    if spec is None and args.coordinator:
        try:
            joined = join_via_coordinator(args.coordinator, args.run, access=coordinator_access)
            check_run_inputs(joined.spec, args.role, args.save_dir, args.access_token, args.identity_path)
        except (DiscoveryError, *INPUT_ERRORS) as e:
            return user_error(e, results)
        spec, initial_peers = joined.spec, initial_peers + joined.initial_peers
        coordinator_key = joined.coordinator_key
        print(
            f"run-peer: joined run {spec.run_id!r} through the coordinator at {args.coordinator}",
            file=sys.stderr,
        )
    options = PeerOptions(
        initial_peers=initial_peers,
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs,
        identity_path=args.identity_path,
        client_mode=args.client_mode,
        join_timeout=args.join_timeout,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        save_dir=args.save_dir,
        max_steps=args.max_steps,
        min_peers=args.min_peers,
        min_peers_timeout=args.min_peers_timeout,
        progress_interval=args.progress_interval,
        coordinator_key=coordinator_key,
        access_token=args.access_token,
    )
    if args.role != "trainer":
        return run_shard_role(args, spec, options, device, results)
    try:
        if spec is None:  # read the run from its signed announcement in the DHT
            dht = start_peer_dht(options, (args.run,))
            try:
                spec = find_run_in_dht(dht, args.run, coordinator_key)
                check_run_inputs(spec, args.role, args.save_dir, args.access_token, args.identity_path)
            except BaseException:
                dht.shutdown()
                raise
            result = run_peer(spec, options, device, stop=threading.Event(), dht=dht, results=results)
        else:
            result = run_peer(spec, options, device, stop=threading.Event(), results=results)
    except (*INPUT_ERRORS, DiscoveryError, OSError) as e:
        return user_error(e, results)
    except NonFiniteLossError as e:  # the peer has left the swarm (run_peer's finally)
        return user_error(e, results, status=1)
    why = (
        "stopped by signal"
        if result.stopped_by_signal
        else "the run is finished at its coordinator"
        if result.run_finished
        else "reached the last global step"
    )
    print(
        f"run-peer: {why}: global step {result.global_step}, {result.local_steps} local steps, "
        f"{result.samples} samples, last loss {result.last_loss:.4f}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
