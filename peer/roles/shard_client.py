"""``run-peer --role client``: train the run's prompt through its shard servers, with the same stage,
optimizer and averaging strategy as a data-parallel trainer (clients average their prompts)."""

from __future__ import annotations

import sys
import threading
import time

import torch

from potluck.hivemind_ext.dht import visible_addresses
from potluck.peer.averaging.choose import make_strategy
from potluck.peer.results import PeerResults
from potluck.peer.roles.trainer import PeerOptions, exit_reason, install_stop_handlers
from potluck.peer.shard.client.remote_model import RemoteCausalLM, open_remote_model
from potluck.peer.shard.client.routing import NoRouteError
from potluck.peer.training.data import PeerDataStream, peer_seed
from potluck.peer.training.loop import Trainer, TrainResult
from potluck.peer.training.metrics import PeerMetrics
from potluck.peer.training.model import load_tokenizer
from potluck.peer.training.progress import ProgressDisplay
from potluck.peer.training.stages import make_stage
from potluck.protocols.runspec import PromptTuningAdapter, RunSpec


def wait_for_route(model: RemoteCausalLM, timeout: float, stop: threading.Event) -> None:
    """Servers may still be announcing themselves: wait until every block is served."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            model.client.router.route(0, model.client.num_blocks)
            return
        except NoRouteError:
            if time.monotonic() > deadline or stop.is_set():
                raise
        stop.wait(1.0)


def train_through_shards(
    spec: RunSpec,
    options: PeerOptions,
    stop: threading.Event,
    route_timeout: float = 120.0,
    results: PeerResults | None = None,
) -> TrainResult:
    """Train the run's prompt through the shard servers until its last global step or ``stop``;
    ``route_timeout``: seconds to wait for servers covering every block. ``results``: see ``--results``."""
    results = results or PeerResults(None, "client")
    if not isinstance(spec.adapter, PromptTuningAdapter):
        raise ValueError(
            f"adapter.kind: --role client trains only prompt_tuning adapters, got {spec.adapter.kind!r} "
            "(a lora adapter trains on the servers themselves: --role shard)"
        )
    if spec.stage != "sft":
        raise ValueError(f"stage: --role client supports sft only (got {spec.stage!r})")
    max_steps = options.max_steps if options.max_steps is not None else spec.max_global_steps
    tokenizer = load_tokenizer(spec.model)
    data = PeerDataStream(spec.data, tokenizer, spec.batch.per_peer_batch_size)
    dht, model = open_remote_model(
        spec,
        options.initial_peers,
        prompt_tokens=spec.adapter.num_virtual_tokens,
        host_maddrs=options.host_maddrs,
        client_mode=options.client_mode,
    )
    metrics = PeerMetrics(spec.run_id)
    if options.metrics_port is not None:
        metrics.serve(options.metrics_port, options.metrics_host)
    try:
        results.joined(str(dht.peer_id), spec.run_id, visible_addresses(dht))
        wait_for_route(model, route_timeout, stop)
        route = model.client.router.route(0, model.client.num_blocks)
        print(f"run-peer: client {dht.peer_id} routes through {route}", file=sys.stderr)
        results.event(
            "route", hops=[{"peer_id": str(h.peer_id), "start": h.start, "end": h.end} for h in route]
        )
        strategy = make_strategy(spec, dht, [model.prompt], listener=results.listener(metrics))
        try:
            install_stop_handlers(stop, strategy)
            trainer = Trainer(
                model=model,
                stage=make_stage(spec.stage),
                strategy=strategy,
                batches=data.batches(peer_seed(spec.seed, str(dht.peer_id))),
                device=torch.device("cpu"),
                max_global_steps=max_steps,
                metrics=metrics,
                progress=ProgressDisplay(max_steps, interval=options.progress_interval),
                stop=stop,
                max_grad_norm=spec.optimizer.max_grad_norm,
                max_nonfinite_losses=spec.optimizer.max_nonfinite_losses,
                on_global_step=results.global_step,
            )
            result = trainer.run()
            results.trained(
                result.global_step,
                result.local_steps,
                result.samples,
                result.last_loss,
                exit_reason(result, options),
            )
            print(f"run-peer: shard client {model.client.metrics.snapshot()}", file=sys.stderr)
            return result
        finally:
            strategy.shutdown()
    finally:
        model.client.shutdown()
        dht.shutdown()
