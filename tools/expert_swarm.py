"""Expert servers of a mixture-of-experts run as ``run-peer --role experts`` processes on loopback, a trainer over
them in this process, and the same model trained as they train it but all in this process: what
``tests/test_experts*.py`` and ``bench/moe.py`` start and compare."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from potluck.peer.shard.client.expert_calls import ExpertClient
from potluck.peer.shard.client.remote_experts import open_remote_moe_model
from potluck.peer.shard.experts import (
    ExpertFFN,
    load_experts,
    load_without_experts,
    moe_config,
    num_experts,
)
from potluck.protocols.runspec import RunSpec
from potluck.tools.peer_processes import LocalSwarm, PeerProcess, wait_on


def start_expert_servers(
    swarm: LocalSwarm,
    placement: dict[str, str],
    timeout: float = 180.0,
    metrics_ports: dict[str, int] | None = None,
) -> list[PeerProcess]:
    """One ``run-peer --role experts`` per entry of ``placement`` (its name → its ``--experts``), each joining the
    first one's DHT; returns them once every one serves. ``metrics_ports``: by name, where a server serves
    ``/metrics``. On a loaded 2-core machine imports, loading and the throughput probe take seconds per server:
    raise ``timeout`` before suspecting them."""
    ports = metrics_ports or {}

    def flags(name: str, experts: str) -> list[str]:
        metrics = ["--metrics-port", str(ports[name])] if name in ports else []
        return ["--role", "experts", "--experts", experts, *metrics]

    (first_name, first_experts), *others = placement.items()
    first = swarm.start_peer(first_name, flags(first_name, first_experts))
    address = swarm.wait_for_address(first, timeout)
    servers = [first] + [
        swarm.start_peer(name, flags(name, experts), initial_peers=[address]) for name, experts in others
    ]
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


class SeparateExperts(nn.Module):
    """One MoE layer's experts in this process, one module each, called like the family's experts module."""

    def __init__(self, experts: list[ExpertFFN]):
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        mixed = torch.zeros_like(hidden)
        for expert in torch.unique(top_k_index).tolist():
            tokens, slots = torch.where(top_k_index == expert)
            mixed.index_add_(
                0, tokens, self.experts[expert](hidden[tokens]) * top_k_weights[tokens, slots, None]
            )
        return mixed


def load_with_separate_experts(model_dir: Path | str) -> nn.Module:
    """The checkpoint's MoE model in this process, trained as expert servers train it: each expert is a module of
    its own (:class:`SeparateExperts`), so an AdamW over the model steps only the experts a batch routed tokens to,
    as a server steps an expert once per backward request. ``from_pretrained`` (transformers 5) keeps a layer's
    experts in one tensor instead: its AdamW steps every expert at every step, on momentum alone when the batch
    routed it no token, and training parts from the servers' from the first such step."""
    model_dir = Path(model_dir)
    config, family = moe_config(model_dir)
    count = num_experts(config)
    # the experts go in after loading: load_without_experts re-allocates (to_empty) every module it is given
    model = load_without_experts(model_dir, lambda layer: nn.Identity())
    experts = load_experts(
        model_dir, [(layer, e) for layer in range(len(model.model.layers)) for e in range(count)]
    )
    for index, layer in enumerate(model.model.layers):
        separate = [experts[(index, e)].requires_grad_(True) for e in range(count)]
        getattr(layer, family.module_block).experts = SeparateExperts(separate)
    return model
