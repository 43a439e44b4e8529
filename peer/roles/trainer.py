"""Build a peer from a run spec and options, train, and shut everything down cleanly."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hivemind.dht import DHT
from hivemind.utils.crypto import RSAPrivateKey

from potluck.hivemind_ext.dht import JOIN_TIMEOUT, RouteKeeper, start_dht, visible_addresses
from potluck.hivemind_ext.keys import sign_records_with_identity
from potluck.peer.averaging.choose import make_strategy
from potluck.peer.averaging.strategy import AveragingStrategy
from potluck.peer.net.access import join_private_run
from potluck.peer.net.reporter import ReportPublisher
from potluck.peer.net.run_status import RunStatusWatch
from potluck.peer.quantization import held_bytes
from potluck.peer.results import PeerResults
from potluck.peer.training.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from potluck.peer.training.data import PeerDataStream, peer_seed
from potluck.peer.training.loop import Trainer, TrainResult
from potluck.peer.training.metrics import PeerMetrics
from potluck.peer.training.model import trainable_parameters
from potluck.peer.training.pause import RunGate
from potluck.peer.training.progress import ProgressDisplay
from potluck.peer.training.stages import make_stage, stage_context
from potluck.peer.training.stages.data import stage_data
from potluck.protocols.records import public_key_tag, record_validators, run_schema_validator
from potluck.protocols.runspec import RunSpec
from potluck.runtime.leaving import LEAVE_SECONDS, leave_within

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerOptions:
    """What ``run-peer`` takes besides the run spec: where and how this peer joins and reports."""

    initial_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = field(default_factory=list)
    identity_path: Path | None = None
    client_mode: bool = False
    join_timeout: float = JOIN_TIMEOUT
    """Seconds to keep trying to reach ``initial_peers`` before giving up (see ``swarm.start_dht``)."""
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    save_dir: Path | None = None
    max_steps: int | None = None
    min_peers: int = 1
    """Wait until this many peers (this one included) are in the run before the first step."""
    min_peers_timeout: float = 120.0
    progress_interval: float = 5.0
    coordinator_key: bytes | None = None
    """The coordinator whose signed announcements of the run's status this peer obeys (paused: hold,
    finished: save and leave; ``peer/training/pause.py``); None: no coordinator, the run is active until
    its last step."""
    access_token: Path | None = None
    """A private run's access token file (``peer/net/access.py``), read again at every publication."""


def install_stop_handlers(stop: threading.Event, strategy: AveragingStrategy | None = None) -> None:
    """SIGINT/SIGTERM ask the loop to finish its step and leave, and the strategy to cut short what
    it waits for on the swarm; a second signal exits at once, and so does a leave still running
    ``LEAVE_SECONDS`` later (``runtime/leaving.py``).

    Installed once the strategy exists (a stop request cuts short what it waits for); until then, Ctrl-C
    ends the starting peer at once (``peer/launch.py``).
    """

    def handle(signum, frame):
        if stop.is_set():
            raise SystemExit(128 + signum)
        print(
            f"\nrun-peer: {signal.Signals(signum).name} received, leaving the swarm (again to force)",
            file=sys.stderr,
        )
        stop.set()
        # the leave in order needs the peer's helpers, which a signal to the whole process group ends too
        leave_within(LEAVE_SECONDS, 128 + signum, "run-peer")
        if strategy is not None:
            strategy.request_stop()

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


def exit_reason(result: TrainResult, options: PeerOptions) -> str:
    """Why training ended: ``signal``, ``run_finished`` (set to finished at the coordinator), ``max_steps``
    (``--max-steps``) or ``finished`` (the spec's last step)."""
    if result.stopped_by_signal:
        return "signal"
    if result.run_finished:
        return "run_finished"
    return "max_steps" if options.max_steps is not None else "finished"


def announce_resume(found: Checkpoint, results: PeerResults) -> None:
    """Say, on stderr and in ``--results``, which checkpoint this peer resumes from."""
    print(f"run-peer: resuming from {found.path} (global step {found.global_step})", file=sys.stderr)
    results.resumed(found.global_step, found.path)


@dataclass
class Checkpointing:
    """A training role's checkpoints (none without ``--save-dir``): every ``checkpoint.save_every`` global steps
    (:meth:`on_global_step`, the ``Trainer``'s hook) and at the end (:meth:`finish`), each reported in ``--results``.
    ``write(save_dir, global_step)`` writes one (the trainer's model, or what a shard client trains) and returns it."""

    save_dir: Path | None
    save_every: int
    results: PeerResults
    write: Callable[[Path, int], Checkpoint]

    def save(self, step: int) -> None:
        if self.save_dir is not None:
            self.results.checkpoint(step, self.write(self.save_dir, step).path)

    def on_global_step(self, step: int) -> None:
        self.results.global_step(step)
        if step % self.save_every == 0:
            self.save(step)

    def finish(self, result: TrainResult, strategy: AveragingStrategy, options: PeerOptions) -> None:
        """The swarm's last average into the model before the last checkpoint (``strategy.settle``), then the end of
        training in ``--results``."""
        if (agreement := strategy.settle()) is not None:
            self.results.final_state(agreement)
        self.save(result.global_step)
        self.results.trained(
            result.global_step,
            result.local_steps,
            result.samples,
            result.last_loss,
            exit_reason(result, options),
        )


def start_peer_dht(
    options: PeerOptions, run_ids: tuple[str, ...] = (), validators: Callable[[], list] | None = None
) -> DHT:
    """This peer's DHT node, with Potluck's record validators (signatures, schemas, sizes; ``validators()``
    instead when given: a shard server's) first, signing its records with the key behind its peer id
    (``hivemind_ext/keys.py``). NOTE: ``validators`` is called only once the identity's key is the process-wide
    one: a signature validator made before would sign with another key, and every node would refuse its records."""
    identity = sign_records_with_identity(options.identity_path)  # before anything takes the process-wide key
    return start_dht(
        options.initial_peers,
        options.host_maddrs,
        options.announce_maddrs,
        None,
        options.client_mode,
        # None: sign with the process-wide key (the identity's), the one hivemind's progress tracker uses too
        record_validators=validators() if validators is not None else record_validators(None, run_ids),
        join_timeout=options.join_timeout,
        identity=identity,
    )


def run_peer(
    spec: RunSpec,
    options: PeerOptions,
    device: torch.device,
    stop: threading.Event,
    dht: DHT | None = None,
    results: PeerResults | None = None,
) -> TrainResult:
    """Train with the swarm until the last global step or ``stop``. ``dht``: an already started node
    (the peer found the run spec through it); it is shut down here either way. ``results``: where the
    events go (``--results``); the caller writes its summary, and has checked the spec's models and data
    (``peer/preflight.check_run_inputs``: a bad line or model path fails before anything loads)."""
    results = results or PeerResults(None, "trainer")
    max_steps = options.max_steps if options.max_steps is not None else spec.max_global_steps
    context = stage_context(spec, device, options.save_dir)  # resolves init_from
    tokenizer = context.tokenizer
    data = PeerDataStream(spec.data, tokenizer, spec.batch.per_peer_batch_size, stage_data(spec, tokenizer))
    resume = latest_checkpoint(options.save_dir, spec.run_id) if options.save_dir else None
    stage = make_stage(spec.stage, context)  # loads the stage's frozen models (reference, teacher, reward)
    model = stage.build_model(weights_from=str(resume.path) if resume else None)
    results.summary.model_bytes = held_bytes(model)
    results.mark("model_loaded")
    if resume:
        announce_resume(resume, results)

    metrics = PeerMetrics(spec.run_id)
    if options.metrics_port is not None:
        metrics.serve(options.metrics_port, options.metrics_host)

    if dht is None:
        dht = start_peer_dht(options, (spec.run_id,))
    else:
        dht.add_validators([run_schema_validator(spec.run_id)])
    results.mark("dht_joined")
    routes = RouteKeeper(dht, [str(a) for a in dht.initial_peers or ()]).start()
    try:
        peer_id = str(dht.peer_id)
        addresses = visible_addresses(dht)
        print(f"run-peer: peer {peer_id} in run {spec.run_id!r}", file=sys.stderr)
        results.joined(peer_id, spec.run_id, addresses)
        if addresses:
            print(
                f"run-peer: others can join with --initial-peers {addresses[0]}", file=sys.stderr, flush=True
            )
        key_tag = public_key_tag(RSAPrivateKey.process_wide())
        access = join_private_run(dht, key_tag, spec, options.access_token)  # before the averagers fork
        strategy = make_strategy(spec, dht, trainable_parameters(model), listener=results.listener(metrics))
        reporter = ReportPublisher(dht, key_tag, spec.run_id, metrics)
        results.mark("strategy_ready")
        watch = None
        if options.coordinator_key is not None:

            def forged(key: str, status: str) -> None:
                results.forged_run_status(key, status)
                metrics.forged_run_status()

            def changed(status: str) -> None:  # a round the others will not come to ends now
                strategy.request_hold(status != "active")

            watch = RunStatusWatch(
                dht, spec.run_id, options.coordinator_key, on_change=changed, on_forged=forged
            ).start()
        try:
            install_stop_handlers(stop, strategy)
            if resume:
                strategy.load_state_dict(torch.load(resume.strategy_state_path, weights_only=False))
            wait_for_peers(strategy, options.min_peers, options.min_peers_timeout, stop)
            results.mark("peers_found")
            downloaded = None if stop.is_set() else strategy.load_state_from_peers()
            results.mark("state_loaded")
            if downloaded is not None:
                print(
                    f"run-peer: loaded the swarm's state of global step {downloaded} "
                    f"from peer {strategy.last_state_donor or '?'} "
                    f"(continuing at global step {strategy.global_step})",
                    file=sys.stderr,
                )
                results.state_loaded(downloaded, strategy.last_state_donor, strategy.global_step)
            reporter.start()

            def write(save_dir: Path, step: int) -> Checkpoint:
                state = strategy.state_dict()
                return save_checkpoint(
                    save_dir, spec.run_id, step, model, tokenizer, state, spec.checkpoint.keep
                )

            checkpointing = Checkpointing(options.save_dir, spec.checkpoint.save_every, results, write)
            trainer = Trainer(
                model=model,
                stage=stage,
                strategy=strategy,
                batches=data.batches(peer_seed(spec.seed, peer_id)),
                device=device,
                max_global_steps=max_steps,
                metrics=metrics,
                progress=ProgressDisplay(max_steps, interval=options.progress_interval),
                stop=stop,
                max_grad_norm=spec.optimizer.max_grad_norm,
                max_nonfinite_losses=spec.optimizer.max_nonfinite_losses,
                on_global_step=checkpointing.on_global_step,
                on_first_step=results.first_step,
                gate=None
                if watch is None
                else RunGate(spec.run_id, lambda: watch.status, strategy, results, metrics, stop),
            )
            result = trainer.run()
            checkpointing.finish(result, strategy, options)
            if metrics.latest_stage:
                figures = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.latest_stage.items()))
                print(f"run-peer: {spec.stage} metrics of the last batch: {figures}", file=sys.stderr)
            return result
        finally:
            if watch is not None:
                watch.stop()
            reporter.stop()
            strategy.shutdown()
            if access is not None:
                access.stop()
    finally:
        routes.stop()
        dht.shutdown()
