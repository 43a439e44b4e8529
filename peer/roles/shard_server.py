"""``run-peer --role shard``: join the DHT, pick a span, load it, serve it, announce it, leave cleanly."""

from __future__ import annotations

import sys
import threading

import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.utils.crypto import RSAPrivateKey

from potluck.hivemind_ext.allreduce import aggregate_with
from potluck.hivemind_ext.dht import visible_addresses
from potluck.peer.net.access import join_private_run
from potluck.peer.quantization import held_bytes, quantize_linears
from potluck.peer.results import PeerResults
from potluck.peer.roles.trainer import PeerOptions, install_stop_handlers, start_peer_dht
from potluck.peer.shard.blocks import load_block_span, load_config, resolve_model_dir
from potluck.peer.shard.metrics import ShardServerMetrics
from potluck.peer.shard.server.adapters import ReplicaAveraging, SpanAdapter
from potluck.peer.shard.server.announce import ShardAnnouncer, choose_span
from potluck.peer.shard.server.service import (
    ServerLimits,
    ShardServicer,
    measure_throughput,
    serve_on,
    stop_server,
)
from potluck.peer.shard.server.span_checkpoint import (
    checkpointed_blocks,
    resume_span_adapter,
    save_span_adapter,
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


def start_server_dht(spec: RunSpec, options: PeerOptions):
    """The DHT of a shard server (block span or experts), with the run's shard record schemas."""
    return start_peer_dht(options, validators=lambda: shard_record_validators(None, spec.run_id))


def joined_as_server(dht, spec: RunSpec, results: PeerResults, what: str) -> bytes:
    """Tell the user and the results that ``what`` joined; the key tag its announcements are filed under."""
    addresses = visible_addresses(dht)
    print(f"run-peer: {what} {dht.peer_id} in run {spec.run_id!r}", file=sys.stderr)
    results.joined(str(dht.peer_id), spec.run_id, addresses)
    if addresses:
        print(f"run-peer: others can join with --initial-peers {addresses[0]}", file=sys.stderr, flush=True)
    return public_key_tag(RSAPrivateKey.process_wide())


def serve_shard(
    spec: RunSpec,
    options: PeerOptions,
    stop: threading.Event,
    blocks: tuple[int, int] | None = None,
    num_blocks: int | None = None,
    limits: ServerLimits | None = None,
    announce_interval: float = 5.0,
    device: torch.device | None = None,
    results: PeerResults | None = None,
) -> None:
    """Serve blocks ``blocks`` of the run's model until ``stop``; without ``blocks``, those of this run's span
    checkpoint in ``options.save_dir``, else the ``num_blocks`` (default: half the model, at least 1) that the
    swarm covers worst. A run with a ``lora`` adapter trains it here (:mod:`adapters`): resumed from the
    checkpoint, or downloaded from a replica further on, before serving; checkpointed every
    ``checkpoint.save_every`` span steps and on a clean exit (:mod:`span_checkpoint`). ``results``: where the
    events go (``--results``)."""
    results = results or PeerResults(None, "shard")
    model_dir = resolve_model_dir(spec.model.name_or_path, spec.model.revision)
    config, _ = load_config(model_dir)
    dht = start_server_dht(spec, options)
    servicer = announcer = p2p = averaging = adapter = access = None
    lora, served = isinstance(spec.adapter, LoraAdapter), False
    try:
        key_tag = joined_as_server(dht, spec, results, "shard server")
        access = join_private_run(dht, key_tag, spec, options.access_token)  # before serving or averaging
        if blocks is None and lora and options.save_dir is not None:
            blocks = checkpointed_blocks(options.save_dir, spec.run_id)  # a restart serves its span again
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
        install_stop_handlers(stop)  # from here a signal ends a state download, then serving, cleanly
        adapter = SpanAdapter(span, spec.adapter, spec) if lora else None
        if adapter is not None:
            averaging = start_span_adapter(spec, options, dht, adapter, blocks, stop, results)
        servicer = ShardServicer(span, spec.run_id, limits or ServerLimits(), metrics, adapter)
        p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        RemoteExpertWorker.run_coroutine(serve_on(p2p, servicer))
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
        served = True
    finally:
        stop_server(announcer, p2p, servicer)
        if averaging is not None:  # before the last checkpoint: no round may change the adapter after it
            averaging.shutdown()
        if served and adapter is not None and options.save_dir is not None:
            with adapter.lock:  # the last span steps, once no request can take another
                saved = save_span_adapter(
                    options.save_dir, spec.run_id, blocks, adapter, spec.checkpoint.keep
                )
            results.checkpoint(saved.global_step, saved.path)
        if access is not None:
            access.stop()
        dht.shutdown()


def start_span_adapter(
    spec: RunSpec,
    options: PeerOptions,
    dht,
    adapter: SpanAdapter,
    blocks: tuple[int, int],
    stop: threading.Event,
    results: PeerResults,
) -> ReplicaAveraging:
    """Resume ``adapter`` from this server's checkpoint, take a replica's state if one is further on, set up its
    periodic checkpoints and start averaging it with the replicas: all before the server serves."""
    if options.save_dir is not None:
        resumed = resume_span_adapter(options.save_dir, spec.run_id, blocks, adapter)
        if resumed is not None:
            print(f"run-peer: resuming the span adapter from {resumed.path} (span step {resumed.global_step})",
                  file=sys.stderr)  # fmt: skip
            results.resumed(resumed.global_step, resumed.path)

        def save(steps: int) -> None:
            if steps % spec.checkpoint.save_every == 0:
                saved = save_span_adapter(
                    options.save_dir, spec.run_id, blocks, adapter, spec.checkpoint.keep
                )
                results.checkpoint(saved.global_step, saved.path)

        adapter.on_step = save
    aggregate_with(spec.averaging.aggregator.rule())  # before the replicas' averager forks
    averaging = ReplicaAveraging(dht, adapter, spec, blocks)
    downloaded = averaging.load_state_from_peers(stop.is_set)
    if downloaded is not None:
        if downloaded.adopted:
            print(f"run-peer: loaded the span adapter of span step {downloaded.steps} from replica "
                  f"{downloaded.donor or '?'}", file=sys.stderr)  # fmt: skip
            results.state_loaded(downloaded.steps, downloaded.donor, adapter.steps)
        else:
            print(f"run-peer: kept the resumed span adapter (span step {adapter.steps}), further on than "
                  f"replica {downloaded.donor or '?'}'s ({downloaded.steps})", file=sys.stderr)  # fmt: skip
    return averaging.start()
