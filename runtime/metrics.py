"""Prometheus series of one registry, declared one line each with the labels they all carry.

The coordinator's collector, a trainer peer and a shard server each own a registry; ``MetricSet``
keeps their declarations to a name, a help text and the labels a series adds.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary


class MetricSet:
    def __init__(self, registry: CollectorRegistry | None = None, labels: Sequence[str] = ()):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.labels = list(labels)

    def _labels(self, extra: Sequence[str]) -> list[str]:
        return [*self.labels, *extra]

    def gauge(self, name: str, documentation: str, *extra_labels: str) -> Gauge:
        return Gauge(name, documentation, self._labels(extra_labels), registry=self.registry)

    def counter(self, name: str, documentation: str, *extra_labels: str) -> Counter:
        return Counter(name, documentation, self._labels(extra_labels), registry=self.registry)

    def histogram(
        self,
        name: str,
        documentation: str,
        *extra_labels: str,
        buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
    ) -> Histogram:
        return Histogram(
            name, documentation, self._labels(extra_labels), buckets=buckets, registry=self.registry
        )

    def summary(self, name: str, documentation: str, *extra_labels: str) -> Summary:
        """A count and a sum (no buckets): an average per label set, cheap where the labels are many."""
        return Summary(name, documentation, self._labels(extra_labels), registry=self.registry)
