"""``run-peer --role client``: train the run's adapter through its shard servers, with the same stage, optimizer
and averaging strategy as a data-parallel trainer; for a mixture-of-experts model, everything but the experts (in
full: attention, embeddings, norms, routers, head), through its expert servers, which train the experts.

What trains where, by ``adapter.kind``: ``prompt_tuning`` and ``prefix`` train on the client (clients average them
as trainers average adapters); ``lora`` trains on the servers, from the gradients the client sends back (the span
replicas average it; the client then has nothing to average). Stages: ``sft``, and ``dpo`` with the servers' base
blocks, without any adapter, as its reference (no second copy of the model), unless ``reference.path`` names one
to load here."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hivemind.utils.crypto import RSAPrivateKey

from potluck.hivemind_ext.dht import visible_addresses
from potluck.peer.averaging.alone import NothingToAverage
from potluck.peer.averaging.choose import make_strategy
from potluck.peer.net.access import join_private_run
from potluck.peer.preflight import check_client_spec
from potluck.peer.results import PeerResults
from potluck.peer.roles.trainer import Checkpointing, PeerOptions, announce_resume, install_stop_handlers
from potluck.peer.shard.client.client_checkpoint import load_client_weights, load_strategy_state, save_client
from potluck.peer.shard.client.expert_calls import ExpertClient
from potluck.peer.shard.client.remote_experts import RemoteExperts, open_remote_moe_model
from potluck.peer.shard.client.remote_model import RemoteCausalLM, open_remote_model
from potluck.peer.shard.client.routing import NoRouteError
from potluck.peer.shard.experts import serves_experts
from potluck.peer.training.data import PeerDataStream, peer_seed
from potluck.peer.training.loop import Trainer, TrainResult
from potluck.peer.training.metrics import PeerMetrics
from potluck.peer.training.progress import ProgressDisplay
from potluck.peer.training.stages import make_stage, stage_context
from potluck.peer.training.stages.data import stage_data
from potluck.protocols.records import public_key_tag
from potluck.protocols.runspec import PrefixTuningAdapter, PromptTuningAdapter, RunSpec
from potluck.runtime.checkpoints import Checkpoint


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


def wait_for_experts(model, client: ExpertClient, timeout: float, stop: threading.Event) -> None:
    """Servers may still be announcing themselves: wait until every expert of every MoE layer is served."""
    uids = [uid for module in model.modules() if isinstance(module, RemoteExperts) for uid in module.uids]
    deadline = time.monotonic() + timeout
    while not client.directory.covers(uids):
        if time.monotonic() > deadline or stop.is_set():
            missing = [uid for uid in uids if not client.directory.candidates(uid)]
            raise NoRouteError(f"no expert server serves {', '.join(missing[:8])} (waited {timeout:g} s)")
        stop.wait(1.0)


def train_through_shards(
    spec: RunSpec,
    options: PeerOptions,
    stop: threading.Event,
    route_timeout: float = 120.0,
    results: PeerResults | None = None,
    device: torch.device | None = None,
    on_trained: Callable[[torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train the run's adapter through the shard servers until its last global step or ``stop``;
    ``route_timeout``: seconds to wait for servers covering every block. ``results``: see ``--results``.
    ``device``: where the client's own parts compute (``--gpu``; default the CPU). ``on_trained(model)``: called
    once training ended, while the servers are still reachable through the model (the MoE demo evaluates it)."""
    results = results or PeerResults(None, "client")
    check_client_spec(spec)
    device = device or torch.device("cpu")
    max_steps = options.max_steps if options.max_steps is not None else spec.max_global_steps
    context = stage_context(spec, device, options.save_dir)
    data = PeerDataStream(
        spec.data, context.tokenizer, spec.batch.per_peer_batch_size, stage_data(spec, context.tokenizer)
    )
    if serves_experts(spec):
        dht, model, client = open_remote_moe_model(
            spec, options.initial_peers, options.host_maddrs, options.client_mode, options.identity_path
        )
        model.to(device)
    else:
        adapter = spec.adapter
        dht, model = open_remote_model(
            spec,
            options.initial_peers,
            prompt_tokens=adapter.num_virtual_tokens if isinstance(adapter, PromptTuningAdapter) else 0,
            prefix_tokens=adapter.num_virtual_tokens if isinstance(adapter, PrefixTuningAdapter) else 0,
            host_maddrs=options.host_maddrs,
            client_mode=options.client_mode,
            device=device,
            identity_path=options.identity_path,
        )
        client = model.client
    metrics = PeerMetrics(spec.run_id)
    if options.metrics_port is not None:
        metrics.serve(options.metrics_port, options.metrics_host)
    access = join_private_run(dht, public_key_tag(RSAPrivateKey.process_wide()), spec, options.access_token)
    try:
        results.joined(str(dht.peer_id), spec.run_id, visible_addresses(dht))
        if isinstance(client, ExpertClient):
            wait_for_experts(model, client, route_timeout, stop)
            servers = sorted(client.directory.servers)
            print(
                f"run-peer: client {dht.peer_id} trains through {len(servers)} expert servers",
                file=sys.stderr,
            )
            results.event("expert_servers", peer_ids=servers)
        else:
            wait_for_route(model, route_timeout, stop)
            route = client.router.route(0, client.num_blocks)
            print(f"run-peer: client {dht.peer_id} routes through {route}", file=sys.stderr)
            results.event(
                "route", hops=[{"peer_id": str(h.peer_id), "start": h.start, "end": h.end} for h in route]
            )
        # before the strategy: hivemind's optimizer takes its own copy of the parameters when it is made
        resumed = load_client_weights(options.save_dir, spec.run_id, model) if options.save_dir else None
        # the prompt or the prefix; none for lora (the servers train and average it); all but the experts of a MoE
        trained = [p for p in model.parameters() if p.requires_grad]
        if trained:
            strategy = make_strategy(spec, dht, trained, listener=results.listener(metrics))
        else:
            strategy = NothingToAverage(spec.batch.target_batch_size)
        # DPO's reference: the servers' base blocks, unless the spec names a model to load
        references = (
            {"reference": model.without_adapters()} if spec.stage == "dpo" and not spec.reference.path else {}
        )
        stage = make_stage(spec.stage, context, **references)
        try:
            install_stop_handlers(stop, strategy)
            if resumed is not None:
                load_strategy_state(resumed, strategy)
                announce_resume(resumed, results)

            def write(save_dir: Path, step: int) -> Checkpoint:
                return save_client(save_dir, spec.run_id, step, model, strategy, spec.checkpoint.keep)

            checkpointing = Checkpointing(options.save_dir, spec.checkpoint.save_every, results, write)

            trainer = Trainer(
                model=model,
                stage=stage,
                strategy=strategy,
                batches=data.batches(peer_seed(spec.seed, str(dht.peer_id))),
                device=device,
                max_global_steps=max_steps,
                metrics=metrics,
                progress=ProgressDisplay(max_steps, interval=options.progress_interval),
                stop=stop,
                max_grad_norm=spec.optimizer.max_grad_norm,
                max_nonfinite_losses=spec.optimizer.max_nonfinite_losses,
                on_global_step=checkpointing.on_global_step,
            )
            result = trainer.run()
            checkpointing.finish(result, strategy, options)
            counters = client.metrics.snapshot()
            print(f"run-peer: shard client {counters}", file=sys.stderr)
            results.event("shard_client", **counters)
            if on_trained is not None:
                on_trained(model)
            return result
        finally:
            strategy.shutdown()
    finally:
        if access is not None:
            access.stop()
        client.shutdown()
        dht.shutdown()
