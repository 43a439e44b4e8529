"""Publishes this peer's signed progress report to the DHT every few seconds.

Peers may sit behind NAT, so nobody scrapes them: the coordinator (or anyone) reads these records.
"""

from __future__ import annotations

import logging
import math
import time

from hivemind.dht import DHT

from potluck.peer.training.metrics import PeerMetrics
from potluck.protocols.records import PeerReport, publish_report
from potluck.runtime.periodic import Periodic

logger = logging.getLogger(__name__)


class ReportPublisher:
    def __init__(self, dht: DHT, key_tag: bytes, run_id: str, metrics: PeerMetrics, interval: float = 5.0):
        self.dht = dht
        self.addresses = [] if dht.client_mode else [str(a) for a in dht.get_visible_maddrs()][:8]
        self.key_tag = key_tag
        self.run_id = run_id
        self.metrics = metrics
        self.interval = interval
        # a report is best effort: a failed one is logged and training goes on
        self._periodic = Periodic(self.publish, interval, "potluck-reporter")

    def start(self) -> ReportPublisher:
        self._periodic.start()
        return self

    def report(self) -> PeerReport:
        latest = self.metrics.latest
        loss = latest["loss"]
        return PeerReport(
            peer_id=str(self.dht.peer_id),
            global_step=int(latest["global_step"]),
            loss=float(loss) if loss is not None and math.isfinite(loss) else None,
            samples_per_second=float(latest["samples_per_second"]),
            samples_total=int(latest["samples_total"]),
            averaging_succeeded=int(latest["averaging_succeeded"]),
            averaging_failed=int(latest["averaging_failed"]),
            bytes_sent=int(latest["bytes_sent"]),
            bytes_received=int(latest["bytes_received"]),
            compute_utilisation=latest["compute_utilisation"],
            reported_at=time.time(),
            addresses=self.addresses,
        )

    def publish(self) -> None:
        publish_report(self.dht, self.key_tag, self.run_id, self.report(), ttl=6 * self.interval)

    def stop(self) -> None:
        self._periodic.stop(grace=1)
