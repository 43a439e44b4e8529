"""Metrics of shard servers (Prometheus, on ``--metrics-port``) and of shard clients and MoE trainers (plain counters).

Server series carry ``run_id`` and the request ``method`` (forward, backward, inference, info); no
per-client labels. Client counters are what a trainer or ``potluck generate --remote`` reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from prometheus_client import start_http_server

from potluck.peer.shard.wire import BAD_REQUEST, BUSY, INTERNAL
from potluck.runtime.metrics import MetricSet


class ShardServerMetrics:
    def __init__(self, run_id: str, start: int | None = None, end: int | None = None):
        """``start``/``end``: a block-span server's blocks (none for an expert server)."""
        run = MetricSet(labels=["run_id"])
        series = MetricSet(run.registry, labels=["run_id", "method"])  # per request method
        self.registry = run.registry
        self.run_id = run_id
        self.requests = series.counter("potluck_shard_requests", "Requests served by this shard server")
        self.failures = series.counter(
            "potluck_shard_request_failures",
            "Requests this server refused or failed, by kind (bad_request, busy, internal)",
            "kind",
        )
        self.latency = series.histogram("potluck_shard_request_seconds", "Time from request to response")
        self.batch_rows = run.histogram(
            "potluck_shard_batch_rows",
            "Rows (sequences) per computed batch, after merging concurrent requests",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.batch_requests = run.histogram(
            "potluck_shard_batch_requests",
            "Requests merged into one computed batch",
            buckets=(1, 2, 3, 4, 8, 16),
        )
        self.sessions = run.gauge(
            "potluck_shard_inference_sessions", "Open inference sessions (attention caches)"
        )
        if start is not None and end is not None:
            span = run.gauge("potluck_shard_span", "The blocks this server holds", "edge")
            span.labels(run_id, "start").set(start)
            span.labels(run_id, "end").set(end)

    def observe_batch(self, requests: int, rows: int) -> None:
        self.batch_requests.labels(self.run_id).observe(requests)
        self.batch_rows.labels(self.run_id).observe(rows)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)


class ExpertServerMetrics(ShardServerMetrics):
    """A shard server's series, and an expert server's own: per expert, tokens, request time and failures; its
    load; its replicas' rounds."""

    def __init__(self, run_id: str):
        super().__init__(run_id)
        expert = MetricSet(self.registry, labels=["run_id", "expert"])
        run = MetricSet(self.registry, labels=["run_id"])
        self.tokens = expert.counter(
            "potluck_expert_tokens", "Tokens sent forward to each expert (<layer>.<expert>) of this server"
        )
        self.expert_seconds = expert.summary(
            "potluck_expert_request_seconds",
            "Time from a valid request for an expert to its answer (queue and compute), by method",
            "method",
        )
        self.expert_failures = expert.counter(
            "potluck_expert_request_failures",
            "Forward and backward requests for an expert of this server that it refused or failed, by kind "
            "(bad_request, busy, internal)",
            "kind",
        )
        self.load = run.gauge(
            "potluck_expert_server_load",
            "Share of the last announcement interval this server spent computing (0 to 1), as it announces it",
        )

        self.replica_rounds = run.counter(
            "potluck_expert_replica_rounds",
            "Averaging rounds of this server's replicated experts, per expert, by outcome (averaged: with every "
            "replica it asked; partial: some did not answer; alone: none did; refused: a replica's state was "
            "malformed or non-finite)",
            "outcome",
        )
        self.downloads = run.counter(
            "potluck_expert_state_downloads",
            "Experts whose state this server took from a replica when it started, by outcome (adopted; kept: "
            "its own resumed state was further on; failed)",
            "outcome",
        )

    def serving(self, experts: list[str]) -> None:
        """Start every served expert's failure series at 0 (a dashboard shows a healthy expert's 0, not no data)."""
        for expert in experts:
            for kind in (BAD_REQUEST, BUSY, INTERNAL):
                self.expert_failures.labels(self.run_id, expert, kind)


@dataclass
class ShardClientMetrics:
    """What a client did to keep going: ``replays`` counts spans re-sent to a replica from kept
    inputs (forward, backward or inference), ``route_changes`` the routes rebuilt after a failure."""

    requests: int = 0
    failures: int = 0
    refused: int = 0
    """Of ``failures``, requests a server refused as malformed (``bad_request``): banned and re-routed like any
    failure, raised only when a second server refuses the same request (``client/refusals.py``)."""
    replays: int = 0
    route_changes: int = 0
    bans: int = 0
    retry_seconds: float = 0.0
    """Wall time spent on failed requests and replays: the latency that failover added."""

    def snapshot(self) -> dict:
        return asdict(self)


@dataclass
class ExpertClientMetrics:
    """What a trainer's calls to expert servers did, and what the fault rule (``client/expert_calls.py``) cost:
        ``rerouted`` counts expert calls that a replica answered because the server that answered the expert last
    failed (in that call, or before it and is banned), ``dropped`` those no
        server answered (that expert's output left out for its tokens, their other gates renormalised),
        ``dropped_tokens`` the token-expert pairs so left out, ``backward_dropped`` backward calls no server answered
        (those tokens' gradient through that expert is lost, and the expert does not learn from them)."""

    requests: int = 0
    failures: int = 0
    refused: int = 0
    """Of ``failures``, requests a server refused as malformed (``bad_request``): banned and re-routed like any
    failure, raised only when a second server refuses the same call (``client/refusals.py``)."""
    bans: int = 0
    rerouted: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    backward_dropped: int = 0
    overflow_tokens: int = 0
    """Token-expert pairs beyond an expert's capacity (``RemoteExperts.capacity_factor``), left out like dropped."""
    idle_steps: int = 0
    """Steps on a zero gradient of experts a backward pass routed no token to (``expert_calls.py``)."""
    idle_steps_failed: int = 0
    """Idle steps no server took (it failed, or the expert had none): those experts missed a step."""
    retry_seconds: float = 0.0
    """Wall time spent on failed requests: the latency that failures added."""
    tokens_by_expert: dict[str, int] = field(default_factory=dict)
    """Tokens sent forward to each expert (``<layer>.<expert>``): how the router balances them."""
    failures_by_expert: dict[str, int] = field(default_factory=dict)
    """Failed requests for each expert, idle steps included."""
    refused_by_expert: dict[str, int] = field(default_factory=dict)
    """Of ``failures_by_expert``, those a server refused as malformed (``bad_request``)."""

    def snapshot(self) -> dict:
        return asdict(self)
