"""A DHT node that lost every route (a partition longer than hivemind's request timeouts) finds its
peers again: hivemind bootstraps only at start."""

from __future__ import annotations

import pytest

from potluck.peer.swarm import RouteKeeper, start_dht
from tests.helpers import wait_until


async def _forget_everyone(dht, node) -> int:
    """Empty the routing table, as hivemind does once requests to every peer have failed."""
    table = node.protocol.routing_table
    for uid in list(table.uid_to_peer_id):
        del table[uid]
    return len(table.uid_to_peer_id)


async def _routes(dht, node) -> set[str]:
    return {str(peer) for peer in node.protocol.routing_table.peer_id_to_uid}


@pytest.mark.timeout(60)
def test_a_node_that_lost_every_route_pings_its_peers_back_into_the_table():
    first = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    initial = [str(a) for a in first.get_visible_maddrs()]
    second = start_dht(initial, ["/ip4/127.0.0.1/tcp/0"], [], None)
    keeper = RouteKeeper(second, initial, interval=0.2)
    try:
        assert str(first.peer_id) in second.run_coroutine(_routes)
        for node in (first, second):  # both sides dropped the other
            assert node.run_coroutine(_forget_everyone) == 0
        keeper.start()
        wait_until(
            lambda: str(first.peer_id) in second.run_coroutine(_routes), 20, "the route to the first node"
        )
        wait_until(lambda: str(second.peer_id) in first.run_coroutine(_routes), 20, "the route back")
        assert keeper.pings >= 1
    finally:
        keeper.stop()
        second.shutdown()
        first.shutdown()
