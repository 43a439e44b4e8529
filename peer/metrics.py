"""Prometheus metrics of one peer, served on ``--metrics-port``.

Names follow Prometheus conventions: ``potluck_`` prefix, base units (seconds, bytes), ``_total`` on
counters. Every series carries the ``run_id`` label and nothing with unbounded cardinality.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class PeerMetrics:
    """Implements :class:`potluck.peer.averaging.AveragingListener` and records training progress."""

    def __init__(self, run_id: str):
        self.registry = CollectorRegistry()
        labels = ["run_id"]
        reg = self.registry
        self._loss = Gauge(
            "potluck_loss", "Training loss of this peer's latest local batch", labels, registry=reg
        )
        self._global_step = Gauge(
            "potluck_global_step", "The swarm's global step as seen by this peer", labels, registry=reg
        )
        self._samples = Counter("potluck_samples", "Samples this peer has trained on", labels, registry=reg)
        self._samples_per_second = Gauge(
            "potluck_samples_per_second",
            "This peer's training throughput (moving average)",
            labels,
            registry=reg,
        )
        self._swarm_samples_per_second = Gauge(
            "potluck_swarm_samples_per_second",
            "The swarm's throughput: target batch per global step time",
            labels,
            registry=reg,
        )
        self._peers = Gauge(
            "potluck_peers", "Peers that recently reported progress in this run", labels, registry=reg
        )
        self._rounds = Counter(
            "potluck_averaging_rounds",
            "Gradient-averaging rounds by outcome",
            labels + ["outcome"],
            registry=reg,
        )
        self._sent = Counter(
            "potluck_averaging_sent_bytes",
            "Payload bytes this peer sent in averaging rounds (estimated from tensor sizes, codec and group size)",
            labels,
            registry=reg,
        )
        self._received = Counter(
            "potluck_averaging_received_bytes",
            "Payload bytes this peer received in averaging rounds (estimated like the sent bytes)",
            labels,
            registry=reg,
        )
        self._step_seconds = Histogram(
            "potluck_step_seconds",
            "Wall time of one local step: forward, backward and the optimizer's bookkeeping",
            labels,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=reg,
        )
        self._state_downloads = Counter(
            "potluck_state_downloads",
            "Attempts to download the swarm's state, by outcome",
            labels + ["outcome"],
            registry=reg,
        )
        self._state_download_seconds = Histogram(
            "potluck_state_download_seconds", "Time spent downloading the swarm's state", labels, registry=reg
        )
        self.run_id = run_id
        # plain copies of what the signed DHT report carries (prometheus objects are write-mostly)
        self.latest = {"global_step": 0, "loss": None, "samples_per_second": 0.0, "samples_total": 0,
                       "averaging_succeeded": 0, "averaging_failed": 0}  # fmt: skip
        for outcome in ("succeeded", "failed"):
            self._rounds.labels(run_id, outcome)
            self._state_downloads.labels(run_id, outcome)

    def serve(self, port: int, host: str) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    # -- training progress ------------------------------------------------------------------------
    def local_step(self, loss: float, samples: int, seconds: float, samples_per_second: float) -> None:
        self._loss.labels(self.run_id).set(loss)
        self._samples.labels(self.run_id).inc(samples)
        self._step_seconds.labels(self.run_id).observe(seconds)
        self._samples_per_second.labels(self.run_id).set(samples_per_second)
        self.latest.update(loss=loss, samples_per_second=samples_per_second)
        self.latest["samples_total"] += samples

    def swarm(self, global_step: int, peers: int, swarm_samples_per_second: float) -> None:
        self._global_step.labels(self.run_id).set(global_step)
        self._peers.labels(self.run_id).set(peers)
        self._swarm_samples_per_second.labels(self.run_id).set(swarm_samples_per_second)
        self.latest["global_step"] = global_step

    # -- AveragingListener ------------------------------------------------------------------------
    def averaging_round(self, succeeded: bool, group_size: int, bytes_sent: int, bytes_received: int) -> None:
        self._rounds.labels(self.run_id, "succeeded" if succeeded else "failed").inc()
        self.latest["averaging_succeeded" if succeeded else "averaging_failed"] += 1
        self._sent.labels(self.run_id).inc(bytes_sent)
        self._received.labels(self.run_id).inc(bytes_received)

    def state_download(self, succeeded: bool, seconds: float) -> None:
        self._state_downloads.labels(self.run_id, "succeeded" if succeeded else "failed").inc()
        self._state_download_seconds.labels(self.run_id).observe(seconds)
