"""One-line Prometheus declarations (runtime/metrics.py): every series carries the set's labels, then its own."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from potluck.runtime.metrics import MetricSet

pytestmark = pytest.mark.unit


def test_series_carry_the_sets_labels_then_their_own_in_the_sets_registry():
    series = MetricSet(labels=["run_id"])
    series.counter("potluck_test_rounds", "Rounds", "outcome").labels("r", "ok").inc(2)
    series.histogram("potluck_test_seconds", "Seconds", buckets=(1, 2)).labels("r").observe(1.5)
    MetricSet(series.registry).gauge("potluck_test_runs", "Runs").set(3)

    text = generate_latest(series.registry).decode()
    assert 'potluck_test_rounds_total{outcome="ok",run_id="r"} 2.0' in text
    assert 'potluck_test_seconds_bucket{le="2.0",run_id="r"} 1.0' in text
    assert "potluck_test_runs 3.0" in text
    assert "potluck_test_runs" not in generate_latest(MetricSet().registry).decode()  # a registry of its own
