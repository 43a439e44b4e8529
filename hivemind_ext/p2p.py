"""Dialling a peer at known addresses, and reading a DHT node's validators.

Upstream lacks a public ``P2P.connect(peer, addresses)``: a node meets peers only through the DHT's own
traffic, so a peer that was dropped from the routing table (after a partition) or a shard server whose
address is known only from its announcement cannot be dialled directly. hivemind itself dials through the
daemon client it keeps in ``P2P._client``; so do we, here only. Nor does it expose the validators a
node runs (``DHTProtocol.record_validator._validators``), which hold the counts of rejected records.
"""

from __future__ import annotations

from collections.abc import Sequence

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

UPSTREAM = {
    "hivemind.p2p.p2p_daemon_bindings.p2pclient.Client.connect": "4a93e314e2e3640a",  # called through P2P._client
    "hivemind.dht.validation.CompositeValidator": "4f51c4d33c991466",  # keeps the validators in _validators
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""


async def connect(p2p: P2P, peer: PeerID, addresses: Sequence[Multiaddr]) -> None:
    """Open a connection to ``peer`` at ``addresses`` (without ``/p2p/``); raises if the daemon cannot."""
    await p2p._client.connect(peer, list(addresses))


def node_validators(node) -> list:
    """The record validators a DHT node (``hivemind.dht.DHTNode``) applies, in order."""
    return list(node.protocol.record_validator._validators)
