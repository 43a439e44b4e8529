"""Prometheus metrics of one peer, served on ``--metrics-port``.

Names follow Prometheus conventions: ``potluck_`` prefix, base units (seconds, bytes), ``_total`` on
counters. Every series carries the ``run_id`` label and nothing with unbounded cardinality.
"""

from __future__ import annotations

import time

from prometheus_client import start_http_server

from potluck.hivemind_ext.access import REFUSED_KINDS, refused_calls
from potluck.hivemind_ext.allreduce import capped_weights, refused_parts
from potluck.peer.averaging.strategy import round_outcome
from potluck.runtime.metrics import MetricSet

STAGE_METRICS = {
    "reward_mean": "Mean reward of the latest batch (RL: rollouts; rm: scores; dpo: implicit reward margin)",
    "reward_std": "Standard deviation of the rewards of the latest batch",
    "kl": "Mean per-token KL of the policy to the frozen reference on the latest batch",
    "policy_loss": "Clipped policy loss of the latest RL batch",
    "value_loss": "Clipped value loss of the latest PPO batch",
    "clip_fraction": "Share of the latest RL batch's completion tokens whose policy ratio was clipped",
    "pairwise_accuracy": "Share of the latest batch's preference pairs the reward model ranks right",
    "preference_accuracy": "Share of the latest batch's pairs whose DPO implicit reward prefers the chosen",
    "teacher_kl": "KL(teacher || student) per completion token of the latest distillation batch",
    "rollout_tokens_per_second": "Tokens generated per second in the latest rollout",
    "generation_time_share": "Share of the latest local step spent generating rollouts",
}
"""Gauges a stage may set through ``PeerMetrics.stage_step`` (names as in ``Stage.last_metrics``)."""


class PeerMetrics:
    """Implements :class:`potluck.peer.averaging.gradient.AveragingListener` and records training progress."""

    def __init__(self, run_id: str):
        series = MetricSet(labels=["run_id"])
        self.registry = series.registry
        self._loss = series.gauge("potluck_loss", "Training loss of this peer's latest local batch")
        self._global_step = series.gauge(
            "potluck_global_step", "The swarm's global step as seen by this peer"
        )
        self._samples = series.counter("potluck_samples", "Samples this peer has trained on")
        self._samples_per_second = series.gauge(
            "potluck_samples_per_second", "This peer's training throughput (moving average)"
        )
        self._swarm_samples_per_second = series.gauge(
            "potluck_swarm_samples_per_second", "The swarm's throughput: target batch per global step time"
        )
        self._peers = series.gauge("potluck_peers", "Peers that recently reported progress in this run")
        self._rounds = series.counter(
            "potluck_averaging_rounds",
            "Global steps by how their gradients were averaged: succeeded (with at least one other peer), "
            "alone (no other peer known or in the group: local gradients only), failed (the round broke)",
            "outcome",
        )
        self._sent = series.counter(
            "potluck_averaging_sent_bytes",
            "Payload bytes this peer sent in averaging rounds (estimated from tensor sizes, codec and group size)",
        )
        self._received = series.counter(
            "potluck_averaging_received_bytes",
            "Payload bytes this peer received in averaging rounds (estimated like the sent bytes)",
        )
        self._nonfinite_losses = series.counter(
            "potluck_nonfinite_losses",
            "Local batches skipped because their loss was NaN or Inf (optimizer.max_nonfinite_losses)",
        )
        self._step_seconds = series.histogram(
            "potluck_step_seconds",
            "Wall time of one local step: forward, backward and the optimizer's bookkeeping",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self._round_seconds = series.histogram(
            "potluck_averaging_round_seconds",
            "Duration of averaging rounds that formed a group (compare with averaging.averaging_timeout)",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
        )
        self._phase_seconds = series.histogram(
            "potluck_averaging_round_phase_seconds",
            "Where a round's time went: group (waiting for the others and forming the group), all_reduce, handoff "
            "(to the training process), apply (e.g. DiLoCo's outer step); rounds of strategies that measure it",
            "phase",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self._wait_seconds = series.counter(
            "potluck_averaging_wait_seconds",
            "Time the training loop was blocked on the swarm (averaging rounds it waited for, state downloads)",
        )
        self._compute_seconds = series.counter(
            "potluck_compute_seconds",
            "Time in local steps not blocked on the swarm: forward, backward, local optimizer",
        )
        self._utilisation = series.gauge(
            "potluck_compute_utilisation",
            "Compute time / wall time since this peer's first local step (1 = never waits on the network)",
        )
        self._paused = series.gauge(
            "potluck_run_paused", "1 while this peer holds because its run is paused at the coordinator"
        )
        self._forged_status = series.counter(
            "potluck_forged_run_status",
            "Announcements of this run's status under another key than its coordinator's (ignored)",
        )
        refused = series.gauge(
            "potluck_refused_averaging_parts",
            "Parts of other peers' tensors this peer's averagers refused (NaN or Inf, or a weight that is not"
            " a finite non-negative number), since start; the peer's log names each sender",
        )
        refused.labels(run_id).set_function(refused_parts)
        capped = series.gauge(
            "potluck_capped_averaging_weights",
            "Senders whose claimed weight this peer's reducers capped at averaging.aggregator.weight_cap x the other"
            " senders' median, once per sender and round, since start; the peer's log names each sender",
        )
        capped.labels(run_id).set_function(capped_weights)
        forbidden = series.gauge(
            "potluck_access_refused",
            "A private run's refusals of peers without a valid access token, since start, by what they tried (join,"
            " part, download, group, record: peers whose records were skipped, shard); the peer's log names each peer",
            "what",
        )
        for what in REFUSED_KINDS:
            forbidden.labels(run_id, what).set_function(lambda what=what: refused_calls()[what])
        self._first_step_at: float | None = None
        self._compute_total = self._pending_wait = 0.0
        self._state_downloads = series.counter(
            "potluck_state_downloads",
            "Attempts to download the swarm's state, by outcome (discarded: a download that did not match"
            " its donor's manifest or held NaN or Inf, thrown away before use; unvouched: under a robust aggregator, no"
            " two donors vouched for one state: three donors' states combined by the rule, or the newest donor's)",
            "outcome",
        )
        self._state_download_seconds = series.histogram(
            "potluck_state_download_seconds", "Time spent downloading the swarm's state"
        )
        self._stage_gauges = {
            name: series.gauge(f"potluck_{name}", text) for name, text in STAGE_METRICS.items()
        }
        self.latest_stage: dict[str, float] = {}
        self.run_id = run_id
        # plain copies of what the signed DHT report carries (prometheus objects are write-mostly)
        self.latest = {"global_step": 0, "loss": None, "samples_per_second": 0.0, "samples_total": 0, "local_steps": 0,
                       "averaging_succeeded": 0, "averaging_failed": 0, "averaging_alone": 0,
                       "bytes_sent": 0, "bytes_received": 0, "compute_utilisation": None,
                       "nonfinite_losses": 0}  # fmt: skip
        self._paused.labels(run_id).set(0)
        self._forged_status.labels(run_id)
        for outcome in ("succeeded", "failed"):
            self._rounds.labels(run_id, outcome)
            self._state_downloads.labels(run_id, outcome)
        self._rounds.labels(run_id, "alone")
        self._state_downloads.labels(run_id, "discarded")

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
        self.latest["local_steps"] += 1
        # the strategy reports its waits (communication_wait) from inside the step timed here
        now = time.monotonic()
        if self._first_step_at is None:
            self._first_step_at = now - seconds
        compute = max(0.0, seconds - self._pending_wait)
        self._pending_wait = 0.0
        self._compute_seconds.labels(self.run_id).inc(compute)
        self._compute_total += compute
        utilisation = min(1.0, self._compute_total / max(now - self._first_step_at, 1e-9))
        self._utilisation.labels(self.run_id).set(utilisation)
        self.latest["compute_utilisation"] = utilisation

    def nonfinite_loss(self) -> None:
        """A local batch was skipped: its loss was NaN or Inf."""
        self._nonfinite_losses.labels(self.run_id).inc()
        self.latest["nonfinite_losses"] += 1

    def swarm(self, global_step: int, peers: int, swarm_samples_per_second: float) -> None:
        self._global_step.labels(self.run_id).set(global_step)
        self._peers.labels(self.run_id).set(peers)
        self._swarm_samples_per_second.labels(self.run_id).set(swarm_samples_per_second)
        self.latest["global_step"] = global_step

    def stage_step(self, values: dict[str, float], step_seconds: float) -> None:
        """Per-stage figures of the latest local batch (``Stage.last_metrics``); unknown names are ignored."""
        values = dict(values)
        if "generation_seconds" in values and step_seconds > 0:
            values["generation_time_share"] = min(1.0, values["generation_seconds"] / step_seconds)
        for name, value in values.items():
            if name in self._stage_gauges:
                self._stage_gauges[name].labels(self.run_id).set(value)
        self.latest_stage = values

    def run_paused(self, paused: bool, seconds: float = 0.0) -> None:
        """The run was paused (``paused``) or the pause has ended after ``seconds``: time held is not wall
        time of training, so compute utilisation leaves it out."""
        self._paused.labels(self.run_id).set(int(paused))
        if not paused and self._first_step_at is not None:
            self._first_step_at += seconds

    def forged_run_status(self) -> None:
        self._forged_status.labels(self.run_id).inc()

    # -- AveragingListener ------------------------------------------------------------------------
    def averaging_round(
        self,
        succeeded: bool,
        group_size: int,
        bytes_sent: int,
        bytes_received: int,
        seconds: float | None = None,
        kept: bool = False,
        phases: dict[str, float] | None = None,
    ) -> None:
        outcome = round_outcome(succeeded, group_size)
        self._rounds.labels(self.run_id, outcome).inc()
        for phase, phase_seconds in (phases or {}).items():
            self._phase_seconds.labels(self.run_id, phase).observe(phase_seconds)
        self.latest[f"averaging_{outcome}"] += 1
        self._sent.labels(self.run_id).inc(bytes_sent)
        self._received.labels(self.run_id).inc(bytes_received)
        self.latest["bytes_sent"] += bytes_sent
        self.latest["bytes_received"] += bytes_received
        if seconds is not None and group_size > 1:
            self._round_seconds.labels(self.run_id).observe(seconds)

    def communication_wait(self, seconds: float) -> None:
        """The training loop waited ``seconds`` on the swarm (called by strategies, inside a step)."""
        self._wait_seconds.labels(self.run_id).inc(seconds)
        self._pending_wait += seconds

    def state_download(self, succeeded: bool, seconds: float, discarded: int = 0, unvouched: int = 0) -> None:
        self._state_downloads.labels(self.run_id, "succeeded" if succeeded else "failed").inc()
        self._state_downloads.labels(self.run_id, "discarded").inc(discarded)
        self._state_downloads.labels(self.run_id, "unvouched").inc(unvouched)
        self._state_download_seconds.labels(self.run_id).observe(seconds)
