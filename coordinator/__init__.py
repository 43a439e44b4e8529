"""The coordinator: run registry (SQLite), DHT bootstrap node, signed run announcements, metric
collection from the DHT, Prometheus ``/metrics`` and the web dashboard. Never on the data path."""

from potluck.runtime import grpc_fork  # noqa: F401 (before anything here imports grpc; see that module)
