"""Dialling a peer at known addresses, reading a DHT node's validators, and a bound on stream frames.

Upstream lacks a public ``P2P.connect(peer, addresses)``: a node meets peers only through the DHT's own
traffic, so a peer that was dropped from the routing table (after a partition) or a shard server whose
address is known only from its announcement cannot be dialled directly. hivemind itself dials through the
daemon client it keeps in ``P2P._client``; so do we, here only. Nor does it expose the validators a
node runs (``DHTProtocol.record_validator._validators``), which hold the counts of rejected records.

Nor does it bound a frame on its streaming RPCs (the averagers' ``rpc_aggregate_part`` and
``rpc_download_state``, the shard servers' ``_stream`` twins): ``P2P.receive_raw_data`` reads the 8-byte
length a caller declares and waits for that many bytes, holding all of them before the message is parsed
and any of our bounds is checked. :func:`bound_stream_frames` refuses a frame declared above
:data:`MAX_FRAME_BYTES` at once (the stream is dropped, the server goes on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

UPSTREAM = {
    "hivemind.p2p.p2p_daemon_bindings.p2pclient.Client.connect": "4a93e314e2e3640a",  # called through P2P._client
    "hivemind.dht.validation.CompositeValidator": "4f51c4d33c991466",  # keeps the validators in _validators
    "hivemind.p2p.p2p_daemon.P2P.receive_raw_data": "353ef452baab5a81",  # copied and replaced, with a bound
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""


async def connect(p2p: P2P, peer: PeerID, addresses: Sequence[Multiaddr]) -> None:
    """Open a connection to ``peer`` at ``addresses`` (without ``/p2p/``); raises if the daemon cannot."""
    await p2p._client.connect(peer, list(addresses))


def node_validators(node) -> list:
    """The record validators a DHT node (``hivemind.dht.DHTNode``) applies, in order."""
    return list(node.protocol.record_validator._validators)


MAX_FRAME_BYTES = 64 * 2**20
"""The most bytes one message on a p2p stream may declare. Every stream sender of a peer sends far less (the
averagers' parts and state chunks, and shard chunks, are 1 MiB at most); a frame above it is refused unread."""


async def _receive_bounded_raw_data(reader: asyncio.StreamReader) -> bytes:
    # hivemind 1.1.12's P2P.receive_raw_data, refusing a declared length above the bound before reading on
    header = await reader.readexactly(P2P.HEADER_LEN)
    content_length = int.from_bytes(header, P2P.BYTEORDER)
    if content_length > MAX_FRAME_BYTES:
        raise ValueError(f"a stream frame declares {content_length} bytes, more than {MAX_FRAME_BYTES}")
    return await reader.readexactly(content_length)


def bound_stream_frames() -> None:
    """Make this process's p2p streams refuse a frame declared above :data:`MAX_FRAME_BYTES` (``start_dht`` calls
    it: averagers forked after it, and shard servers on a replica of its daemon, inherit it)."""
    P2P.receive_raw_data = staticmethod(_receive_bounded_raw_data)
