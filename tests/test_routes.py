"""A DHT node finds its peers: it keeps trying initial peers that do not answer yet (up to a bound),
and one that lost every route (a partition longer than hivemind's request timeouts) finds its peers
again, since hivemind bootstraps only at start."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import partial

import pytest
from hivemind.p2p import PeerID

from potluck.hivemind_ext.dht import RouteKeeper, SwarmJoinError, start_dht
from tests.helpers import address_of_a_peer_not_started, wait_until


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


async def _forget(dht, node, peer: str) -> None:
    table = node.protocol.routing_table
    del table[table.get(peer_id=PeerID.from_base58(peer))]


@pytest.mark.timeout(60)
def test_a_node_pings_back_a_peer_it_lost_while_it_still_has_others(tmp_path):
    """A 2-vs-2 split: each side keeps its own half in its table, so the table is never empty and
    hivemind's own lookups never cross back; the peers lost from it are pinged back. A dead initial
    peer (it never answers) does not hold that up."""
    dead, _, _ = address_of_a_peer_not_started(tmp_path)
    first = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    initial = [str(a) for a in first.get_visible_maddrs()]
    second = start_dht(initial, ["/ip4/127.0.0.1/tcp/0"], [], None)
    third = start_dht([str(a) for a in second.get_visible_maddrs()], ["/ip4/127.0.0.1/tcp/0"], [], None)
    keeper = RouteKeeper(second, [*initial, dead], interval=0.2).start()
    try:
        assert {str(first.peer_id), str(third.peer_id)} <= second.run_coroutine(_routes)
        wait_until(lambda: keeper.ticks >= 1, 20, "the keeper to read the table once")
        second.run_coroutine(partial(_forget, peer=str(third.peer_id)))
        assert str(first.peer_id) in second.run_coroutine(_routes), "the table is not empty"
        wait_until(
            lambda: str(third.peer_id) in second.run_coroutine(_routes), 20, "the route to the lost peer"
        )
        assert keeper.answered >= 1
    finally:
        keeper.stop()
        for node in (third, second, first):
            node.shutdown()


@pytest.mark.timeout(120)
def test_a_node_keeps_trying_its_initial_peer_until_it_answers(tmp_path):
    """A bootstrap peer that is late (restarting, or its link busy past libp2p's one 5 s dial) does
    not stop a joining node: it tries again, and joins once the peer answers."""
    address, listen, identity = address_of_a_peer_not_started(tmp_path)
    log = tmp_path / "joiner.log"
    code = (
        "from potluck.hivemind_ext.dht import start_dht\n"
        f"dht = start_dht([{address!r}], ['/ip4/127.0.0.1/tcp/0'], [], None)\n"
        "print('joined', flush=True)\n"
        "dht.shutdown()\n"
    )
    with log.open("w") as out:
        joiner = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    late = None
    try:
        wait_until(lambda: "(attempt 1)" in log.read_text(), 60, "the joiner's first attempt to fail")
        late = start_dht([], [listen], [], identity)
    finally:
        try:
            joiner.wait(timeout=60)
        finally:
            joiner.kill()
            if late is not None:
                late.shutdown()
    assert joiner.returncode == 0 and "joined" in log.read_text(), log.read_text()


@pytest.mark.timeout(60)  # bounded: it does not retry forever
def test_a_node_whose_initial_peers_never_answer_gives_up_naming_them(tmp_path):
    address, _, _ = address_of_a_peer_not_started(tmp_path)
    with pytest.raises(SwarmJoinError) as raised:
        start_dht([address], ["/ip4/127.0.0.1/tcp/0"], [], None, join_timeout=3)
    message = str(raised.value)
    assert address in message
    attempts = re.search(r"in (\d+) attempt", message)
    assert attempts and int(attempts.group(1)) >= 2, message  # it tried again before giving up
