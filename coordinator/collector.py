"""The coordinator's DHT side: announce runs (signed) and collect peers' signed reports.

Every ``interval`` seconds it re-announces active and paused runs (finished ones for
``FINISHED_ANNOUNCED_SECONDS``: the status in the announcement is how peers learn to hold and to leave),
reads each run's peer reports, stores them and one history point per run in SQLite, and updates the
Prometheus gauges. It is never on the training data path: if it stops, peers keep training and only the
history pauses.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable

from hivemind.dht import DHT
from prometheus_client import CollectorRegistry

from potluck.coordinator.store import HistoryPoint, PeerReportRow, RunRecord, RunStore
from potluck.hivemind_ext.access import AccessList
from potluck.protocols.access import access_key, token_checker
from potluck.protocols.records import (
    REPORT_REFUSALS,
    ReportGate,
    RunAnnouncement,
    announce_run,
    read_announcements,
    read_reports,
    rejection_counts,
    run_schema_validator,
)
from potluck.runtime.metrics import MetricSet
from potluck.runtime.periodic import Periodic

logger = logging.getLogger(__name__)
MAX_PEER_SERIES = 32
"""Per-peer series per run are capped (Prometheus label cardinality); the rest show up only in totals."""
FRESH_SECONDS = 30.0
"""A peer whose newest report is older than this is not counted as online."""
FINISHED_ANNOUNCED_SECONDS = 600.0
"""A finished run is still announced (as finished) for this long after it finished, so that its peers
learn it even if they could not read the DHT for a while then: they save and leave (``peer/training/pause.py``)."""


class SwarmMetrics:
    def __init__(self, registry: CollectorRegistry):
        series = MetricSet(registry)
        run, peer = ("run_id",), ("run_id", "peer")
        self.runs = series.gauge("potluck_runs", "Runs registered at the coordinator, by status", "status")
        self.global_step = series.gauge(
            "potluck_run_global_step", "Highest global step reported in the run", *run
        )
        self.peers = series.gauge("potluck_run_peers", "Peers with a fresh report in the run", *run)
        self.loss = series.gauge("potluck_run_loss", "Mean of the peers' latest training loss", *run)
        self.throughput = series.gauge(
            "potluck_run_samples_per_second", "Sum of the peers' training throughput", *run
        )
        self.rounds = series.gauge(
            "potluck_run_averaging_rounds", "Averaging rounds reported by the online peers", *run, "outcome"
        )
        self.averaging_bytes = series.gauge(
            "potluck_run_averaging_bytes",
            "Payload bytes the online peers sent / received in averaging rounds so far (sum over peers)",
            *run,
            "direction",
        )
        self.utilisation = series.gauge(
            "potluck_run_compute_utilisation",
            "Mean compute utilisation (time computing / wall time) of the online peers that report it",
            *run,
        )
        self.peer_step = series.gauge(
            "potluck_peer_global_step", "A peer's global step (first peers only)", *peer
        )
        self.peer_loss = series.gauge("potluck_peer_loss", "A peer's latest loss (first peers only)", *peer)
        self.peer_throughput = series.gauge(
            "potluck_peer_samples_per_second", "A peer's throughput (first peers only)", *peer
        )
        self.rejected = series.counter(
            "potluck_dht_records_rejected", "DHT records refused or skipped, by reason", "reason"
        )
        self.collections = series.counter("potluck_collections", "Collection rounds run by the coordinator")
        self.last_collection = series.gauge(
            "potluck_last_collection_timestamp_seconds", "When the coordinator last read the DHT"
        )
        for reason in (
            "signature", "schema", "oversized", "untrusted_announcement", "malformed", "unsigned",
            *REPORT_REFUSALS,
        ):  # fmt: skip
            self.rejected.labels(reason)


class Collector:
    def __init__(
        self, dht: DHT, store: RunStore, key_tag: bytes, metrics: SwarmMetrics, interval: float = 5.0
    ):
        self.dht = dht
        self.store = store
        self.key_tag = key_tag
        self.metrics = metrics
        self.interval = interval
        self._known_runs: set[str] = set()
        self._rejections_seen: Tally = Tally()
        self._gates: dict[str, ReportGate] = {}
        self._announcing = threading.Lock()
        # a failed round (DHT hiccup, locked database) is logged; the next one may succeed
        self._periodic = Periodic(self.collect_once, interval, "potluck-collector", immediately=True)

    def start(self) -> Collector:
        self._periodic.start()
        return self

    def stop(self) -> None:
        self._periodic.stop(grace=10)

    def announce(self, run: RunRecord) -> None:
        """Publish (or refresh) the signed announcement of a run; called on publish, on a status change
        (a gRPC thread) and every round (this collector's thread)."""
        with self._announcing:
            # the status as stored now, not as the round read it: a round that read "active" just before
            # an operator paused the run would otherwise announce "active" after the "paused", and the
            # newer announcement is the one peers read (they would resume until the next round)
            run = self.store.get_run(run.run_id)
            if run.run_id not in self._known_runs:
                self.dht.add_validators([run_schema_validator(run.run_id)])
                self._known_runs.add(run.run_id)
            announcement = RunAnnouncement(
                run_id=run.run_id, spec_json=json.dumps(run.spec), status=run.status, announced_at=time.time()
            )
            announce_run(self.dht, self.key_tag, announcement, ttl=max(60.0, 6 * self.interval))

    def collect_once(self) -> None:
        runs = self.store.list_runs()
        for status in ("active", "paused", "finished"):
            self.metrics.runs.labels(status).set(sum(r.status == status for r in runs))
        for run in runs:
            if run.status == "finished":
                self._forget_run_series(run.run_id)  # a finished run must not keep alerts firing
                if time.time() - run.updated_at < FINISHED_ANNOUNCED_SECONDS:
                    self.announce(run)
                continue
            self.announce(run)
            self._collect_run(run.run_id)
        skipped = read_announcements(self.dht, self.key_tag).skipped
        self._count_rejections(Tally(rejection_counts(self.dht)) + skipped)
        self.metrics.collections.inc()
        self.metrics.last_collection.set(time.time())

    def _collect_run(self, run_id: str) -> None:
        found = read_reports(self.dht, run_id)
        now = time.time()
        if run_id not in self._gates:
            self._gates[run_id] = ReportGate(self._access_check(run_id))
        gate = self._gates[run_id]
        refused_before = Tally(gate.refused)
        admitted = [r for owner, r in found.records.items() if gate.admit(owner, r, now)]
        skipped = found.skipped + (gate.refused - refused_before)
        self._count_rejections(Tally({f"{run_id}:{k}": v for k, v in skipped.items()}), per_run=True)
        reports = [r for r in admitted if now - r.reported_at <= FRESH_SECONDS]
        self.store.remember_peer_addresses({r.peer_id: r.addresses for r in reports}, now)
        self.store.add_peer_reports(
            [
                PeerReportRow(
                    run_id,
                    r.peer_id,
                    r.reported_at,
                    r.global_step,
                    r.loss,
                    r.samples_per_second,
                    r.samples_total,
                    r.bytes_sent,
                    r.bytes_received,
                    r.compute_utilisation,
                )
                for r in admitted
            ]
        )
        m = self.metrics
        _drop_series((m.peer_step, m.peer_loss, m.peer_throughput), run_id)  # peers that left
        self.metrics.peers.labels(run_id).set(len(reports))
        if not reports:
            return
        losses = [r.loss for r in reports if r.loss is not None]
        utilisations = [r.compute_utilisation for r in reports if r.compute_utilisation is not None]
        point = HistoryPoint(
            collected_at=now,
            global_step=max(r.global_step for r in reports),
            loss=sum(losses) / len(losses) if losses else None,
            samples_per_second=sum(r.samples_per_second for r in reports),
            peers=len(reports),
            bytes_sent=sum(r.bytes_sent for r in reports),
            bytes_received=sum(r.bytes_received for r in reports),
            compute_utilisation=sum(utilisations) / len(utilisations) if utilisations else None,
        )
        self.store.add_history_point(run_id, point)
        self.metrics.global_step.labels(run_id).set(point.global_step)
        self.metrics.throughput.labels(run_id).set(point.samples_per_second)
        if point.loss is not None:
            self.metrics.loss.labels(run_id).set(point.loss)
        self.metrics.rounds.labels(run_id, "succeeded").set(sum(r.averaging_succeeded for r in reports))
        self.metrics.rounds.labels(run_id, "failed").set(sum(r.averaging_failed for r in reports))
        self.metrics.averaging_bytes.labels(run_id, "sent").set(point.bytes_sent)
        self.metrics.averaging_bytes.labels(run_id, "received").set(point.bytes_received)
        if point.compute_utilisation is not None:
            self.metrics.utilisation.labels(run_id).set(point.compute_utilisation)
        for r in sorted(reports, key=lambda r: r.peer_id)[:MAX_PEER_SERIES]:
            short = r.peer_id[-12:]
            self.metrics.peer_step.labels(run_id, short).set(r.global_step)
            self.metrics.peer_throughput.labels(run_id, short).set(r.samples_per_second)
            if r.loss is not None:
                self.metrics.peer_loss.labels(run_id, short).set(r.loss)

    def _access_check(self, run_id: str) -> Callable[[str], bool] | None:
        """A private run's check of a reporting peer's token (its reports are refused without one); None: public."""
        access = self.store.get_run(run_id).spec.get("access") or {}
        if not access.get("private"):
            return None
        return AccessList(access_key(run_id), token_checker(run_id, access["owner_key"]), self.dht).admits

    def _forget_run_series(self, run_id: str) -> None:
        m = self.metrics
        gauges = (
            m.global_step,
            m.peers,
            m.loss,
            m.throughput,
            m.rounds,
            m.averaging_bytes,
            m.utilisation,
            m.peer_step,
            m.peer_loss,
            m.peer_throughput,
        )
        _drop_series(gauges, run_id)

    def _count_rejections(self, totals: Tally, per_run: bool = False) -> None:
        """DHT nodes and readers keep cumulative counts; turn them into counter increments."""
        for name, total in totals.items():
            new = total - self._rejections_seen[name] if not per_run else total
            self._rejections_seen[name] = max(self._rejections_seen[name], total)
            if new > 0:
                self.metrics.rejected.labels(name.split(":")[-1]).inc(new)


def _drop_series(gauges, run_id: str) -> None:
    """Remove every series of ``run_id`` (the first label) from the gauges."""
    for gauge in gauges:
        for labels in list(gauge._metrics):
            if labels[0] == run_id:
                gauge.remove(*labels)
