"""How a client, or a server asking its replicas, calls a shard server's RPC (a block-span server's or an expert
server's): dial the addresses the
server announced the first time (the DHT may not have met it yet), send a message above hivemind's unary cap in
chunks to the method's streaming twin (:mod:`..streaming`), and give the whole exchange one timeout."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from hivemind.p2p import PeerID, ServicerBase
from hivemind.utils.multiaddr import Multiaddr

from potluck.hivemind_ext.p2p import connect
from potluck.peer.shard import streaming


class Transport:
    """Calls to servers of ``servicer``'s class through ``p2p``; ``addresses_of(peer_id)``: its announced
    multiaddrs."""

    def __init__(self, p2p, servicer: type[ServicerBase], addresses_of: Callable[[str], list[str]]):
        self.p2p, self.servicer, self.addresses_of = p2p, servicer, addresses_of
        self._dialed: set[str] = set()

    async def stub(self, peer_id: str):
        peer = PeerID.from_base58(peer_id)
        if peer_id not in self._dialed:
            # suppressed: a stale or malformed address in a record must not make the server unreachable
            with contextlib.suppress(Exception):
                addresses = [Multiaddr(a) for a in self.addresses_of(peer_id)]
                if addresses:
                    await connect(self.p2p, peer, addresses)
            self._dialed.add(peer_id)
        return self.servicer.get_stub(self.p2p, peer)

    async def call(
        self, peer_id: str, method: str, message, timeout: float, response_bytes: int | None = None
    ):
        """``response_bytes``: the tensor bytes the response may carry, when more than the request's (a state
        download); above the unary cap, the response comes back in chunks too."""
        stub = await self.stub(peer_id)
        streamed = getattr(stub, f"rpc_{method}_stream", None)
        big_response = response_bytes is not None and response_bytes > streaming.UNARY_BYTES
        if streamed is None or not (streaming.needs_streaming(message) or big_response):
            return await getattr(stub, f"rpc_{method}")(message, timeout=timeout)
        # hivemind's streams take no timeout of their own
        return await asyncio.wait_for(streaming.call(streamed, message, response_bytes), timeout)
