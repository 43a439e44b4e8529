"""Build a peer from a run spec and options, train, and shut everything down cleanly."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hivemind.dht import DHT
from hivemind.utils.crypto import RSAPrivateKey

from potluck.peer.averaging import AveragingStrategy, GradientAveraging
from potluck.peer.checkpoint import latest_checkpoint, save_checkpoint
from potluck.peer.data import PeerDataStream, peer_seed
from potluck.peer.metrics import PeerMetrics
from potluck.peer.model import build_model, load_tokenizer, trainable_parameters
from potluck.peer.progress import ProgressDisplay
from potluck.peer.reporter import ReportPublisher
from potluck.peer.stages import make_stage
from potluck.peer.swarm import start_dht, visible_addresses
from potluck.peer.trainer import Trainer, TrainResult
from potluck.protocols.records import public_key_tag, record_validators, run_schema_validator
from potluck.protocols.runspec import RunSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerOptions:
    """What ``run-peer`` takes besides the run spec: where and how this peer joins and reports."""

    initial_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = field(default_factory=list)
    identity_path: Path | None = None
    client_mode: bool = False
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    save_dir: Path | None = None
    max_steps: int | None = None
    min_peers: int = 1
    """Wait until this many peers (this one included) are in the run before the first step."""
    min_peers_timeout: float = 120.0
    progress_interval: float = 5.0


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGINT/SIGTERM ask the loop to finish its step and leave; a second signal exits at once.

    Must run after the averagers are created: creating one leaves SIGINT ignored in this process.
    """

    def handle(signum, frame):
        if stop.is_set():
            raise SystemExit(128 + signum)
        print(
            f"\nrun-peer: {signal.Signals(signum).name} received, leaving the swarm (again to force)",
            file=sys.stderr,
        )
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def wait_for_peers(strategy: AveragingStrategy, count: int, timeout: float, stop: threading.Event) -> None:
    """Hold the first step until ``count`` peers are online, so a small swarm starts together
    instead of the first peer racing ahead alone (then the others only download its state)."""
    if count <= 1:
        return
    deadline = time.monotonic() + timeout
    # wait until the peers are announced *and* hivemind's tracker, which decides global steps, sees them
    while (online := strategy.peers_in_run()) < count or strategy.progress().peers < count:
        if stop.is_set():
            return
        if time.monotonic() > deadline:
            print(
                f"run-peer: only {online}/{count} peers after {timeout:.0f}s; starting anyway",
                file=sys.stderr,
            )
            return
        stop.wait(0.3)
    print(f"run-peer: {online} peer(s) online", file=sys.stderr)


def start_peer_dht(options: PeerOptions, run_ids: tuple[str, ...] = ()) -> DHT:
    """This peer's DHT node, with Potluck's record validators (signatures, schemas, sizes) first."""
    return start_dht(
        options.initial_peers,
        options.host_maddrs,
        options.announce_maddrs,
        options.identity_path,
        options.client_mode,
        # None: sign with the process-wide key, the one hivemind's progress tracker uses too
        record_validators=record_validators(None, run_ids),
    )


def run_peer(
    spec: RunSpec, options: PeerOptions, device: torch.device, stop: threading.Event, dht: DHT | None = None
) -> TrainResult:
    """Train with the swarm until the last global step or ``stop``. ``dht``: an already started node
    (the peer found the run spec through it); it is shut down here either way."""
    max_steps = options.max_steps if options.max_steps is not None else spec.max_global_steps
    tokenizer = load_tokenizer(spec.model)
    data = PeerDataStream(spec.data, tokenizer, spec.batch.per_peer_batch_size)  # fails fast on bad data
    resume = latest_checkpoint(options.save_dir, spec.run_id) if options.save_dir else None
    model = build_model(spec, device, weights_from=str(resume.path) if resume else None)
    if resume:
        print(f"run-peer: resuming from {resume.path} (global step {resume.global_step})", file=sys.stderr)

    metrics = PeerMetrics(spec.run_id)
    if options.metrics_port is not None:
        metrics.serve(options.metrics_port, options.metrics_host)

    if dht is None:
        dht = start_peer_dht(options, (spec.run_id,))
    else:
        dht.add_validators([run_schema_validator(spec.run_id)])
    try:
        peer_id = str(dht.peer_id)
        addresses = visible_addresses(dht)
        print(f"run-peer: peer {peer_id} in run {spec.run_id!r}", file=sys.stderr)
        if addresses:
            print(
                f"run-peer: others can join with --initial-peers {addresses[0]}", file=sys.stderr, flush=True
            )
        strategy = GradientAveraging(spec, dht, trainable_parameters(model), listener=metrics)
        reporter = ReportPublisher(dht, public_key_tag(RSAPrivateKey.process_wide()), spec.run_id, metrics)
        try:
            install_stop_handlers(stop)
            if resume:
                strategy.load_state_dict(torch.load(resume.strategy_state_path, weights_only=False))
            wait_for_peers(strategy, options.min_peers, options.min_peers_timeout, stop)
            downloaded = strategy.load_state_from_peers()
            if downloaded is not None:
                print(
                    f"run-peer: loaded the swarm's state of global step {downloaded} "
                    f"(continuing at global step {strategy.global_step})",
                    file=sys.stderr,
                )
            reporter.start()

            def save(step: int) -> None:
                if options.save_dir is not None:
                    save_checkpoint(
                        options.save_dir,
                        spec.run_id,
                        step,
                        model,
                        tokenizer,
                        strategy.state_dict(),
                        spec.checkpoint.keep,
                    )

            def on_global_step(step: int) -> None:
                if step % spec.checkpoint.save_every == 0:
                    save(step)

            trainer = Trainer(
                model=model,
                stage=make_stage(spec.stage),
                strategy=strategy,
                batches=data.batches(peer_seed(spec.seed, peer_id)),
                device=device,
                max_global_steps=max_steps,
                target_batch_size=spec.batch.target_batch_size,
                metrics=metrics,
                progress=ProgressDisplay(max_steps, interval=options.progress_interval),
                stop=stop,
                max_grad_norm=spec.optimizer.max_grad_norm,
                on_global_step=on_global_step,
            )
            result = trainer.run()
            save(result.global_step)
            return result
        finally:
            reporter.stop()
            strategy.shutdown()
    finally:
        dht.shutdown()
