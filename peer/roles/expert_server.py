"""``run-peer --role experts``: join the DHT, load the chosen experts of the run's mixture-of-experts model, take
the state of the replicas further on, train them from the gradients trainers send, average them with their
replicas, announce them, checkpoint them, leave cleanly."""

from __future__ import annotations

import sys
import threading

import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

from potluck.peer.net.access import join_private_run
from potluck.peer.results import PeerResults
from potluck.peer.roles.shard_server import joined_as_server, start_server_dht
from potluck.peer.roles.trainer import PeerOptions, install_stop_handlers
from potluck.peer.shard.blocks import resolve_model_dir
from potluck.peer.shard.experts import load_experts, moe_config, parse_experts
from potluck.peer.shard.metrics import ExpertServerMetrics
from potluck.peer.shard.server.expert_checkpoint import resume_experts, save_experts
from potluck.peer.shard.server.expert_replicas import ExpertReplicas
from potluck.peer.shard.server.expert_service import (
    ExpertAnnouncer,
    ExpertServicer,
    ServedExperts,
    measure_expert_throughput,
)
from potluck.peer.shard.server.service import ServerLimits, serve_on, stop_server
from potluck.protocols.experts import expert_uid
from potluck.protocols.runspec import NoAdapter, RunSpec


def serve_experts(
    spec: RunSpec,
    options: PeerOptions,
    stop: threading.Event,
    experts: str,
    limits: ServerLimits | None = None,
    announce_interval: float = 5.0,
    device: torch.device | None = None,
    results: PeerResults | None = None,
) -> None:
    """Serve and train the experts ``experts`` (``--experts`` syntax: ``experts.parse_experts``) of the run's model
    until ``stop``; with ``options.save_dir``, resume them from there and checkpoint them every
    ``checkpoint.save_every`` optimizer steps and on a clean exit."""
    results = results or PeerResults(None, "experts")
    if not isinstance(spec.adapter, NoAdapter):
        raise ValueError(f"adapter.kind: --role experts trains its experts in full; set it to none, not "
                         f"{spec.adapter.kind!r}")  # fmt: skip
    model_dir = resolve_model_dir(spec.model.name_or_path, spec.model.revision)
    config, _ = moe_config(model_dir)
    uids = parse_experts(experts, config)
    dht = start_server_dht(spec, options)
    servicer = announcer = p2p = served = replicas = access = None
    clean = False
    try:
        key_tag = joined_as_server(dht, spec, results, "expert server")
        access = join_private_run(dht, key_tag, spec, options.access_token)  # before serving
        device = device or torch.device("cpu")
        loaded = load_experts(model_dir, uids, dtype=getattr(torch, spec.model.dtype))
        served = ServedExperts({uid: expert.to(device) for uid, expert in loaded.items()}, spec)
        if options.save_dir is not None:
            resumed = resume_experts(options.save_dir, spec.run_id, served)
            if resumed is not None:
                print(f"run-peer: resuming the experts from {resumed.path}", file=sys.stderr)
                results.resumed(resumed.global_step, resumed.path)
            served.on_step = lambda: _checkpoint_every(spec, options, served, results)
        throughput = measure_expert_throughput(next(iter(served.experts.values())), config.hidden_size)
        metrics = ExpertServerMetrics(spec.run_id)
        if options.metrics_port is not None:
            metrics.serve(options.metrics_port, options.metrics_host)
        install_stop_handlers(stop)
        p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        replicas = ExpertReplicas(dht, p2p, spec, served, metrics)
        for got in replicas.download():
            taken = "took" if got.adopted else "kept its own, further on than"
            print(f"run-peer: expert {got.uid}: {taken} the state of replica {got.donor} (step {got.steps})",
                  file=sys.stderr)  # fmt: skip
            results.event(
                "expert_downloaded", uid=got.uid, donor=got.donor, steps=got.steps, adopted=got.adopted
            )
        servicer = ExpertServicer(
            served, spec.run_id, config.hidden_size, limits or ServerLimits(), metrics, replicas.round_state
        )
        RemoteExpertWorker.run_coroutine(serve_on(p2p, servicer))
        announcer = ExpertAnnouncer(
            dht, key_tag, spec.run_id, uids, throughput, announce_interval, load=servicer.load
        ).start()
        replicas.start()
        names = [expert_uid(*uid) for uid in uids]
        print(f"run-peer: serving experts {' '.join(names)} ({throughput:.0f} tokens/s per expert)",
              file=sys.stderr, flush=True)  # fmt: skip
        results.event("serving", experts=names, tokens_per_second=throughput)
        stop.wait()
        results.summary.exit_reason = "signal"  # nothing else ends serving
        clean = True
    finally:
        if replicas is not None:
            replicas.shutdown()
        stop_server(announcer, p2p, servicer)
        if clean and served is not None and options.save_dir is not None:
            saved = save_experts(options.save_dir, spec.run_id, served, spec.checkpoint.keep)
            results.checkpoint(saved.global_step, saved.path)
        if access is not None:
            access.stop()
        dht.shutdown()


def _checkpoint_every(
    spec: RunSpec, options: PeerOptions, served: ServedExperts, results: PeerResults
) -> None:
    # on the compute thread, between requests: save_experts takes each expert's lock in turn
    if served.total_steps % spec.checkpoint.save_every == 0:
        saved = save_experts(options.save_dir, spec.run_id, served, spec.checkpoint.keep)
        results.checkpoint(saved.global_step, saved.path)
