"""Joining the swarm: the hivemind DHT node of this peer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

from hivemind.dht import DHT
from hivemind.p2p import P2PDaemonError, PeerID
from hivemind.utils.multiaddr import Multiaddr

from potluck.hivemind_ext.keys import SigningIdentity
from potluck.hivemind_ext.lifeline import bind_children
from potluck.hivemind_ext.p2p import bound_stream_frames, connect
from potluck.runtime.periodic import Periodic

logger = logging.getLogger(__name__)


JOIN_TIMEOUT = 60.0
"""Seconds a starting node keeps trying to reach its initial peers before giving up."""

_NOBODY_ANSWERED = (
    "failed to connect to bootstrap peers",  # p2pd: no initial peer accepted a connection
    "none of the initial_peers responded",  # hivemind's DHT node: connected, but no ping came back
)

UPSTREAM = {
    "hivemind.dht.dht.DHT.__init__": "27f69e86e6784ef6",  # makes _inner_pipe; start=False leaves the process unstarted
    "hivemind.dht.dht.DHT.run": "bd3a376f042d386e",  # reads requests with _inner_pipe's fileno, poll and recv
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


class _Requests:
    """The DHT process's end of its request pipe, which skips a request it cannot read instead of dying of it.

    A request carries the sender's end of a pipe for its answer (hivemind's ``MPFuture``), which the DHT process
    fetches from the sending process as it reads the request. When that process has exited in between (an averager
    shut down with a DHT request of its own in flight: a peer leaving), hivemind's read raised ``EOFError`` and
    the DHT process died with a traceback (seen at a peer's exit in a fresh-clone suite). Nobody waits for that
    request's answer any more: it is skipped and logged. A pipe closed by every sender still ends the process."""

    def __init__(self, pipe):
        self._pipe = pipe

    def fileno(self) -> int:
        return self._pipe.fileno()

    def poll(self, timeout: float = 0.0) -> bool:
        return self._pipe.poll(timeout)

    def close(self) -> None:
        self._pipe.close()

    def recv(self):
        message = self._pipe.recv_bytes()  # EOFError here: every sender has closed the pipe (as before)
        try:
            return ForkingPickler.loads(message)
        except (EOFError, OSError) as error:
            logger.info(f"DHT: skipped a request whose sender left before it was read ({error!r})")
            return ("_skip", [], {})


class SturdyDHT(DHT):
    """hivemind's DHT, whose process outlives a request that cannot be read (:class:`_Requests`)."""

    def __init__(self, *args, start: bool, await_ready: bool = True, **kwargs):
        super().__init__(*args, start=False, **kwargs)
        self._inner_pipe = _Requests(self._inner_pipe)
        if start:
            self.run_in_background(await_ready=await_ready)

    async def _skip(self) -> None:
        """The request that :class:`_Requests` could not read: nothing to do."""


def start_dht(
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str],
    identity_path: Path | None,
    client_mode: bool = False,
    record_validators: Sequence = (),
    ensure_bootstrap_success: bool = True,
    join_timeout: float = JOIN_TIMEOUT,
    identity: SigningIdentity | None = None,
) -> DHT:
    """Start this peer's DHT node (a child process running hivemind's libp2p daemon).

    With no ``initial_peers`` the node starts a new swarm; others join it with the addresses that
    :func:`visible_addresses` returns. ``identity_path`` keeps the peer id stable across restarts
    (the file is created on first use).

    libp2p gives up on a peer after one dial (5 s for a private address), and a home link that is
    busy averaging can lose a handshake for that long, so the node retries, with growing pauses,
    until ``join_timeout`` seconds have passed; then :class:`SwarmJoinError` says which addresses
    did not answer.

    ``identity`` (a peer process: ``keys.sign_records_with_identity``, called before its record validators are
    made) replaces ``identity_path``: the node's peer id is then that of the key its records are signed with.
    """
    if identity is not None:
        identity_path = identity.path
    elif identity_path is not None:
        identity_path.parent.mkdir(parents=True, exist_ok=True)
    bind_children()  # the DHT, averagers and p2pd die with this process, even on SIGKILL
    bound_stream_frames()  # before any averager forks or shard server registers on this process's p2p
    try:
        started, pause, attempt = time.monotonic(), 1.0, 0
        while True:
            attempt += 1
            try:
                return SturdyDHT(
                    start=True,
                    initial_peers=list(initial_peers),
                    host_maddrs=list(host_maddrs),
                    announce_maddrs=list(announce_maddrs) or None,
                    identity_path=str(identity_path) if identity_path else None,
                    client_mode=client_mode,
                    record_validators=list(record_validators),
                    ensure_bootstrap_success=ensure_bootstrap_success,
                    await_ready=True,
                    # an identity made just now is nobody else's: no dial to ask the swarm
                    check_if_identity_free=identity is None or not identity.fresh,
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
    finally:
        if identity is not None:
            identity.forget()  # the daemon has read it; a temporary one goes


def visible_addresses(dht: DHT) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


PING_TIMEOUT = 5.0
"""Seconds one dial and ping of a lost peer may take (libp2p gives a private address 5 s)."""

RETRY_AT_MOST_EVERY = 10.0
"""The longest pause between two pings of a peer that keeps not answering (the pause doubles from
``interval``): after a long partition the two sides find each other within this much of the heal."""

PINGS_AT_ONCE = 16
"""Lost peers pinged at the same time (after a large split, every peer has lost many)."""

STOP_WAIT_SECONDS = 0.5
"""How long ``RouteKeeper.stop`` waits for a tick in progress."""

FORGET_AFTER = 600.0
"""Seconds after which a peer that has answered no ping is taken to have left for good (initial peers
are never forgotten)."""


class RouteKeeper:
    """Dials back the peers this node has lost from its DHT routing table.

    hivemind drops a peer from the routing table once a request to it fails, and bootstraps only at
    start: a node cut off for long enough had no route left when the network came back, and the
    others had dropped it too. Neither side ever asked again: a peer partitioned for 60 s from a
    4-peer swarm trained alone for good (issue 16), and in a 2-vs-2 split each side keeps its own
    half in its table, so hivemind's own lookups never cross back either.

    Every ``interval`` seconds this pings, concurrently and each bounded by ``PING_TIMEOUT``, the
    initial peers and every peer seen in the table since start that is not in it now; a ping re-adds
    the peer on both sides. A peer that does not answer is pinged less often (the pause doubles up to
    ``RETRY_AT_MOST_EVERY``) and forgotten after ``FORGET_AFTER`` seconds of silence, unless it is an
    initial peer. An initial peer is dialled at its address first (the daemon may have dropped an
    address it has not reached for a while). A tick never waits for the DHT longer than ``interval``
    plus the ping timeout: a dial that hung inside the daemon once stopped the keeper for good.
    """

    def __init__(self, dht: DHT, initial_peers: Sequence[str], interval: float = 2.0):
        self._dht, self._interval = dht, interval
        self._initial = {
            PeerID.from_base58(Multiaddr(a)["p2p"]).to_bytes(): a for a in initial_peers if "/p2p/" in a
        }
        self._lost: dict[bytes, _Lost] = {}
        self._known: set[bytes] = set()
        self.pings = 0
        """Pings sent to lost peers."""
        self.answered = 0
        """Lost peers that answered (and are back in the routing table)."""
        self.ticks = 0
        """Ticks that read the routing table."""
        # a tick fails only while the DHT is shutting down: not worth more than a debug line
        self._periodic = Periodic(self._tick, interval, "potluck-route-keeper", error_level=logging.DEBUG)

    def start(self) -> RouteKeeper:
        self._periodic.start()
        return self

    def stop(self) -> None:
        # a tick may be waiting on pings to peers that are gone (PING_TIMEOUT): a leaving peer does not
        # wait for them (up to 2.7 s of a SIGTERM in tests/test_swarm.py); the DHT stops next
        self._periodic.stop(wait=STOP_WAIT_SECONDS)

    def _ask(self, coroutine, extra: float = 0.0):
        # the coroutine runs in the DHT's process: a module function, pickled with its arguments
        return self._dht.run_coroutine(coroutine, return_future=True).result(timeout=self._interval + extra)

    def _tick(self) -> None:
        own = self._dht.peer_id.to_bytes()
        table = set(self._ask(_table))
        self._known.update(table)
        self.ticks += 1
        now = time.monotonic()
        for peer in table:
            self._lost.pop(peer, None)
        missing = (self._known | self._initial.keys()) - table - {own}
        due = []
        for peer in missing:
            lost = self._lost.setdefault(peer, _Lost(since=now, next_try=now))
            if peer not in self._initial and now - lost.since > FORGET_AFTER:
                self._known.discard(peer)
                del self._lost[peer]
            elif now >= lost.next_try:
                due.append(peer)
        if not due or self._periodic.stopping.is_set():  # nothing sent to a DHT that is shutting down
            return
        self.pings += len(due)
        targets = [(peer, self._initial.get(peer)) for peer in due]
        answered: set[bytes] = set()
        try:  # a dial and a ping, each bounded by PING_TIMEOUT
            answered = set(self._ask(partial(_ping_all, targets=targets), extra=2 * PING_TIMEOUT))
        finally:
            self.answered += len(answered)
            for peer in due:
                if peer in answered:
                    self._lost.pop(peer, None)
                else:
                    lost = self._lost[peer]
                    lost.pause = min(2 * lost.pause if lost.pause else self._interval, RETRY_AT_MOST_EVERY)
                    lost.next_try = now + lost.pause


@dataclass
class _Lost:
    since: float
    """When the peer was first found missing from the table."""
    next_try: float
    pause: float = 0.0


async def _table(dht: DHT, node) -> list[bytes]:
    """The peers in the node's routing table."""
    return [peer.to_bytes() for peer in node.protocol.routing_table.peer_id_to_uid]


async def _ping_all(dht: DHT, node, targets: list[tuple[bytes, str | None]]) -> list[bytes]:
    """Ping every target (dialled first at its address, if given), ``PINGS_AT_ONCE`` at a time; the ones that
    answered."""
    at_once = asyncio.Semaphore(PINGS_AT_ONCE)

    async def ping(raw: bytes, address: str | None) -> bytes | None:
        async with at_once:
            return await _ping(raw, address)

    async def _ping(raw: bytes, address: str | None) -> bytes | None:
        peer = PeerID(raw)
        if address is not None:
            maddr = Multiaddr(address)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    connect(node.p2p, peer, [maddr.decapsulate("/p2p/" + maddr["p2p"])]), PING_TIMEOUT
                )
        with contextlib.suppress(Exception):
            if await asyncio.wait_for(
                node.protocol.call_ping(peer, validate=False, strict=False), PING_TIMEOUT
            ):
                logger.info(f"route keeper: {peer} is reachable again")
                return raw
        return None

    found = await asyncio.gather(*(ping(raw, address) for raw, address in targets))
    return [raw for raw in found if raw is not None]
