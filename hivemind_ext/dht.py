"""Joining the swarm: the hivemind DHT node of this peer."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from hivemind.dht import DHT
from hivemind.p2p import P2PDaemonError, PeerID
from hivemind.utils.multiaddr import Multiaddr

from potluck.hivemind_ext.lifeline import bind_children
from potluck.hivemind_ext.p2p import connect
from potluck.runtime.periodic import Periodic

logger = logging.getLogger(__name__)


JOIN_TIMEOUT = 60.0
"""Seconds a starting node keeps trying to reach its initial peers before giving up."""

_NOBODY_ANSWERED = (
    "failed to connect to bootstrap peers",  # p2pd: no initial peer accepted a connection
    "none of the initial_peers responded",  # hivemind's DHT node: connected, but no ping came back
)

UPSTREAM = {
    "hivemind.dht.node.DHTNode.create": "f681de9c85567343",  # raises 'none of the initial_peers responded', matched by text
    "hivemind.p2p.p2p_daemon.P2P.create": "2e4720e954b79b67",  # raises the daemon's 'failed to connect to bootstrap peers', matched by text
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""


class SwarmJoinError(ConnectionError):
    """None of the initial peers could be reached within the join timeout."""


class MultiaddrError(ValueError):
    """A multiaddr that the node's daemon would refuse; ``str()`` is one line naming it and what is wrong."""


def check_multiaddrs(addresses: Sequence[str], what: str, peer: bool = False, port: bool = False) -> None:
    """Raise :class:`MultiaddrError` for the first of ``addresses`` that does not parse, or that lacks a trailing
    ``/p2p/<peer id>`` (``peer``: a peer to dial) or has port 0 (``port``: an address to announce). ``what``
    names them in the message (a flag such as ``--initial-peers``).

    Without it the daemon refused them only once it started, which a peer does after loading its model, and
    said so in a traceback. NOTE: hivemind's parser is the one checked against; the daemon parses them again
    with go-multiaddr, which knows a few transports more (e.g. ``webtransport``) that hivemind does not use."""
    for text in addresses:
        try:
            address = Multiaddr(text)
        except ValueError as e:  # hivemind's StringParseError, one line with the failing protocol
            problem, protocol = getattr(e, "message", str(e)), getattr(e, "protocol", None)
            if protocol == "p2p":
                raise MultiaddrError(f"{what} {text}: {_after(text, '/p2p/')!r} is not a peer id") from None
            where = f" (at /{protocol})" if protocol else ""
            raise MultiaddrError(f"{what} {text}: not a multiaddr: {problem}{where}") from None
        if peer and address.protocols()[-1].name != "p2p":
            raise MultiaddrError(
                f"{what} {text}: no /p2p/<peer id> at the end; use the whole address a peer prints "
                "('others can join with --initial-peers ...')"
            )
        if port and any(
            address.value_for_protocol(p.code) == "0" for p in address.protocols() if p.name in ("tcp", "udp")
        ):
            raise MultiaddrError(
                f"{what} {text}: port 0 cannot be announced; give the port that others reach this peer on"
            )


def _after(text: str, marker: str) -> str:
    return text.split(marker, 1)[-1].split("/", 1)[0]


def start_dht(
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str],
    identity_path: Path | None,
    client_mode: bool = False,
    record_validators: Sequence = (),
    ensure_bootstrap_success: bool = True,
    join_timeout: float = JOIN_TIMEOUT,
) -> DHT:
    """Start this peer's DHT node (a child process running hivemind's libp2p daemon).

    With no ``initial_peers`` the node starts a new swarm; others join it with the addresses that
    :func:`visible_addresses` returns. ``identity_path`` keeps the peer id stable across restarts
    (the file is created on first use).

    libp2p gives up on a peer after one dial (5 s for a private address), and a home link that is
    busy averaging can lose a handshake for that long, so the node retries, with growing pauses,
    until ``join_timeout`` seconds have passed; then :class:`SwarmJoinError` says which addresses
    did not answer.
    """
    if identity_path is not None:
        identity_path.parent.mkdir(parents=True, exist_ok=True)
    bind_children()  # the DHT, averagers and p2pd die with this process, even on SIGKILL
    started, pause, attempt = time.monotonic(), 1.0, 0
    while True:
        attempt += 1
        try:
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
        except (P2PDaemonError, RuntimeError) as error:
            if not any(reason in str(error) for reason in _NOBODY_ANSWERED):
                raise
            elapsed = time.monotonic() - started
            if elapsed + pause > join_timeout:
                raise SwarmJoinError(
                    f"none of the initial peers answered in {attempt} attempt(s) over {elapsed:.0f} s: "
                    f"{', '.join(initial_peers)} (is the address right, is that peer running, and can "
                    "this machine reach it?)"
                ) from None
            logger.warning(
                f"none of the initial peers answered (attempt {attempt}); trying again in {pause:.0f} s"
            )
            time.sleep(pause)
            pause = min(2 * pause, 16.0)


def visible_addresses(dht: DHT) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


class RouteKeeper:
    """Pings the peers this node has known whenever its DHT routing table is empty.

    hivemind drops a peer from the routing table once requests to it fail, and bootstraps only at
    start, so a node cut off for long enough (30 s on the home-like bed) had no route left when the
    network came back: it found no donor to download the swarm's state from and kept retrying, while
    the others had dropped it too. A ping re-adds the peer on both sides. The peers pinged are the
    initial peers and every peer seen in the routing table since start (the libp2p daemon still knows
    their addresses); while the table holds anyone, hivemind's own lookups repair it.
    """

    def __init__(self, dht: DHT, initial_peers: Sequence[str], interval: float = 5.0):
        self._dht, self._interval = dht, interval
        self._initial = [a for a in initial_peers if "/p2p/" in a]
        self._known: set[bytes] = set()
        self.pings = 0
        """Peers pinged because the routing table was empty."""
        # a tick fails only while the DHT is shutting down: not worth more than a debug line
        self._periodic = Periodic(self._tick, interval, "potluck-route-keeper", error_level=logging.DEBUG)

    def start(self) -> RouteKeeper:
        self._periodic.start()
        return self

    def stop(self) -> None:
        self._periodic.stop()

    def _tick(self) -> None:
        # the coroutine runs in the DHT's process: a module function, pickled with its arguments
        table, pinged = self._dht.run_coroutine(
            partial(_keep_routes, initial=self._initial, known=sorted(self._known))
        )
        self._known.update(table)
        self.pings += pinged


async def _keep_routes(dht: DHT, node, initial: list[str], known: list[bytes]) -> tuple[list[bytes], int]:
    """(the peers in the routing table, how many peers were pinged because it was empty)."""
    table = node.protocol.routing_table
    if table.peer_id_to_uid:
        return [peer.to_bytes() for peer in table.peer_id_to_uid], 0
    addresses = {PeerID.from_base58(Multiaddr(a)["p2p"]): Multiaddr(a) for a in initial}
    targets = {*addresses, *(PeerID(raw) for raw in known)} - {node.peer_id}
    for peer in targets:
        if peer in addresses:  # the daemon may have dropped an address it has not reached for a while
            address = addresses[peer]
            with contextlib.suppress(Exception):
                await connect(node.p2p, peer, [address.decapsulate("/p2p/" + address["p2p"])])
        if await node.protocol.call_ping(peer, validate=False, strict=False) is not None:
            logger.info(f"route keeper: {peer} is reachable again")
    return [peer.to_bytes() for peer in table.peer_id_to_uid], len(targets)
