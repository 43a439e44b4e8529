"""Joining the swarm: the hivemind DHT node of this peer."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hivemind.dht import DHT

from potluck.peer.lifeline import bind_children

logger = logging.getLogger(__name__)


def start_dht(
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str],
    identity_path: Path | None,
    client_mode: bool = False,
    record_validators: Sequence = (),
    ensure_bootstrap_success: bool = True,
) -> DHT:
    """Start this peer's DHT node (a child process running hivemind's libp2p daemon).

    With no ``initial_peers`` the node starts a new swarm; others join it with the addresses that
    :func:`visible_addresses` returns. ``identity_path`` keeps the peer id stable across restarts
    (the file is created on first use).
    """
    if identity_path is not None:
        identity_path.parent.mkdir(parents=True, exist_ok=True)
    bind_children()  # the DHT, averagers and p2pd die with this process, even on SIGKILL
    return DHT(
        start=True,
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        identity_path=str(identity_path) if identity_path else None,
        client_mode=client_mode,
        record_validators=list(record_validators),
        ensure_bootstrap_success=ensure_bootstrap_success,
        await_ready=True,
    )


def visible_addresses(dht: DHT) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]
