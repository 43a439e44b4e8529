"""Expert servers of a mixture-of-experts run as ``run-peer --role experts`` processes on loopback, and a trainer
over them in this process: what ``tests/test_experts*.py`` and ``bench/moe.py`` start."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from potluck.peer.shard.client.expert_calls import ExpertClient
from potluck.peer.shard.client.remote_experts import open_remote_moe_model
from potluck.protocols.runspec import RunSpec
from potluck.tools.peer_processes import LocalSwarm, PeerProcess, wait_on


def start_expert_servers(
    swarm: LocalSwarm,
    placement: dict[str, str],
    timeout: float = 180.0,
    metrics_ports: dict[str, int] | None = None,
    entries: dict[str, tuple[str, ...]] | None = None,
) -> list[PeerProcess]:
    """One ``run-peer --role experts`` per entry of ``placement`` (its name → its ``--experts``), each joining the
    first one's DHT; returns them once every one serves. ``metrics_ports``: by name, where a server serves
    ``/metrics``; ``entries``: by name, a script run instead of run-peer (``LocalSwarm.start_peer``'s ``entry``). On a loaded 2-core machine imports, loading and the throughput probe take seconds per server:
    raise ``timeout`` before suspecting them."""
    ports, scripts = metrics_ports or {}, entries or {}

    def start(name: str, experts: str, **joining) -> PeerProcess:
        metrics = ["--metrics-port", str(ports[name])] if name in ports else []
        entry = {"entry": scripts[name]} if name in scripts else {}
        return swarm.start_peer(
            name, ["--role", "experts", "--experts", experts, *metrics], **entry, **joining
        )

    (first_name, first_experts), *others = placement.items()
    first = start(first_name, first_experts)
    address = swarm.wait_for_address(first, timeout)
    servers = [first] + [start(name, experts, initial_peers=[address]) for name, experts in others]
    for server in servers:
        swarm.wait_for_event(server, "serving", timeout)
    return servers


@contextlib.contextmanager
def moe_trainer(
    spec: RunSpec, servers: list[PeerProcess], timeout: float = 60.0, **client_options
) -> Iterator[tuple[nn.Module, ExpertClient]]:
    """The run's MoE model over ``servers`` (``open_remote_moe_model``; ``client_options``: ``ExpertClient``'s),
    once this trainer's DHT finds every one of them announced; its client and DHT are shut down on exit."""
    dht, model, client = open_remote_moe_model(spec, [s.join_address() for s in servers], **client_options)
    try:
        expected = {s.peer_id() for s in servers}

        def all_announced() -> bool:
            client.directory.refresh(force=True)
            return expected <= set(client.directory.servers)

        wait_on(all_announced, timeout, f"the {len(servers)} expert servers announced in the DHT")
        yield model, client
    finally:
        client.shutdown()
        dht.shutdown()
