"""``run-peer --role shard``: join the DHT, pick a span, load it, serve it, announce it, leave cleanly."""

from __future__ import annotations

import contextlib
import sys
import threading

import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.utils.crypto import RSAPrivateKey

from potluck.hivemind_ext.allreduce import aggregate_with
from potluck.hivemind_ext.dht import start_dht, visible_addresses
from potluck.hivemind_ext.keys import sign_records_with_identity
from potluck.peer.quantization import held_bytes, quantize_linears
from potluck.peer.results import PeerResults
from potluck.peer.roles.trainer import PeerOptions, install_stop_handlers
from potluck.peer.shard.blocks import load_block_span, load_config, resolve_model_dir
from potluck.peer.shard.metrics import ShardServerMetrics
from potluck.peer.shard.server.adapters import ReplicaAveraging, SpanAdapter
from potluck.peer.shard.server.announce import ShardAnnouncer, choose_span
from potluck.peer.shard.server.service import (
    ServerLimits,
    ShardServicer,
    measure_throughput,
    serve_on,
    stop_serving,
)
from potluck.protocols.records import public_key_tag
from potluck.protocols.runspec import LoraAdapter, RunSpec
from potluck.protocols.shards import read_shards, shard_record_validators


def parse_blocks(text: str) -> tuple[int, int]:
    """``START:END`` → (start, end); raises ValueError with a message for the user."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--blocks: expected START:END (e.g. 0:4), got {text!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"--blocks: {text!r} is empty or negative")
    return start, end


def serve_shard(
    spec: RunSpec,
    options: PeerOptions,
    stop: threading.Event,
    blocks: tuple[int, int] | None = None,
    num_blocks: int | None = None,
    limits: ServerLimits | None = None,
    announce_interval: float = 5.0,
    average_every: float = 5.0,
    device: torch.device | None = None,
    results: PeerResults | None = None,
) -> None:
    """Serve blocks ``blocks`` of the run's model until ``stop``; without ``blocks``, the
    ``num_blocks`` (default: half the model, at least 1) that the swarm covers worst. A run with a
    ``lora`` adapter trains it here (see :mod:`adapters`), averaged with replicas every
    ``average_every`` seconds. ``results``: where the events go (``--results``)."""
    results = results or PeerResults(None, "shard")
    model_dir = resolve_model_dir(spec.model.name_or_path, spec.model.revision)
    config, _ = load_config(model_dir)
    identity = sign_records_with_identity(options.identity_path)  # before anything takes the process-wide key
    dht = start_dht(
        options.initial_peers,
        options.host_maddrs,
        options.announce_maddrs,
        None,
        options.client_mode,
        record_validators=shard_record_validators(None, spec.run_id),
        join_timeout=options.join_timeout,
        identity=identity,
    )
    servicer = announcer = p2p = averaging = None
    try:
        addresses = visible_addresses(dht)
        print(f"run-peer: shard server {dht.peer_id} in run {spec.run_id!r}", file=sys.stderr)
        results.joined(str(dht.peer_id), spec.run_id, addresses)
        if addresses:
            print(
                f"run-peer: others can join with --initial-peers {addresses[0]}", file=sys.stderr, flush=True
            )
        key_tag = public_key_tag(RSAPrivateKey.process_wide())
        if blocks is None:
            length = num_blocks or max(1, config.num_hidden_layers // 2)
            blocks = choose_span(
                list(read_shards(dht, spec.run_id).records.values()), config.num_hidden_layers, length
            )
            # claim the span before loading it, so the next server to start sees it taken
            ShardAnnouncer(dht, key_tag, spec.run_id, blocks, 0.0, announce_interval).announce("joining")
            print(
                f"run-peer: chose blocks {blocks[0]}:{blocks[1]} (the least covered)",
                file=sys.stderr,
                flush=True,
            )
            results.event("blocks_chosen", start=blocks[0], end=blocks[1])
        results.summary.blocks = list(blocks)
        span = load_block_span(model_dir, *blocks, dtype=getattr(torch, spec.model.dtype))
        span = quantize_linears(span, spec.model, device or torch.device("cpu"))  # as model.quantization says
        span = span.to(device or torch.device("cpu"))
        results.summary.model_bytes = held_bytes(span)
        throughput = measure_throughput(span)
        metrics = ShardServerMetrics(spec.run_id, *blocks)
        if options.metrics_port is not None:
            metrics.serve(options.metrics_port, options.metrics_host)
        adapter = SpanAdapter(span, spec.adapter, spec) if isinstance(spec.adapter, LoraAdapter) else None
        if adapter is not None:
            aggregate_with(spec.averaging.aggregator.rule())  # before the replicas' averager forks
            averaging = ReplicaAveraging(dht, adapter, spec, blocks, average_every).start()
        servicer = ShardServicer(span, spec.run_id, limits or ServerLimits(), metrics, adapter)
        p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        RemoteExpertWorker.run_coroutine(serve_on(p2p, servicer))
        install_stop_handlers(stop)
        announcer = ShardAnnouncer(dht, key_tag, spec.run_id, blocks, throughput, announce_interval).start()
        print(
            f"run-peer: serving blocks {blocks[0]}:{blocks[1]} of {config.num_hidden_layers} "
            f"({throughput:.0f} tokens/s per block)",
            file=sys.stderr,
            flush=True,
        )
        results.event("serving", start=blocks[0], end=blocks[1], tokens_per_second=throughput)
        stop.wait()
        results.summary.exit_reason = "signal"  # nothing else ends serving
    finally:
        if announcer is not None:
            announcer.stop()
        if averaging is not None:
            averaging.shutdown()
        if servicer is not None:
            if p2p is not None:
                with contextlib.suppress(Exception):  # leaving anyway; the daemon goes with the DHT
                    RemoteExpertWorker.run_coroutine(stop_serving(p2p, servicer))
            servicer.shutdown()
        dht.shutdown()
