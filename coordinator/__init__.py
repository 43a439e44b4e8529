"""The coordinator (run registry, bootstrap node, metrics collection, dashboard).

TODO: not built yet — see the "Coordinator and protocols" issue. Peers work without it
(`run-peer --initial-peers ...`), which is the design: the coordinator is never on the data path.
"""
