"""Private runs: only peers holding a token from the run's owner average, serve state, or are served.

hivemind admits anyone who reaches a peer: its averagers accept every join request, every part of a group they
are in and every state download request, and its ``TokenAuthorizerBase`` guards DHT RPCs only (and is abstract).
Here a run's peers publish their access tokens (``protocols/access.py``, which says what a valid one is) under the
run's access key, and :class:`AccessList` reads them: a peer id is admitted while a token signed by the owner key names it and has not
expired. libp2p authenticates the peer id of every stream (``context.remote_id``), so nobody can borrow another
peer's token.

:class:`GatedAveraging` puts the check in front of an averager's three RPCs (a join request gets
``NOT_LOOKING_FOR_GROUP``, so the caller moves on; parts get ``PROTOCOL_VIOLATION``; a download request an empty
stream, so a newcomer asks its next donor), in front of its matchmaking (it does not ask a leader without a token
to take it in) and before each all-reduce: a group with a member that holds no token
(a leader that let it in, or a token that expired) does not average; each member keeps its own tensors, and the
round says none of the average arrived (``rounds.PARTIAL``). A peer downloads state only from admitted donors
(:func:`admitted`). Each refusal is logged once per peer and kind, and counted (:func:`refused_calls`).

A process sets its run's list with :func:`admit_with` before its averagers fork, as ``allreduce.aggregate_with``
sets the aggregator; without it (a public run) everyone is admitted, as in hivemind.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Iterable
from typing import AsyncIterator  # noqa: UP035 (hivemind finds streaming RPCs by typing's name)

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import ValueWithExpiration

from potluck.hivemind_ext.keys import peer_id_of_owner
from potluck.hivemind_ext.rounds import PARTIAL, CheckedRounds

logger = logging.getLogger(__name__)

UPSTREAM = {
    "hivemind.averaging.averager.DecentralizedAverager.rpc_join_group": "a0c1dec1f5165713",  # wrapped
    "hivemind.averaging.averager.DecentralizedAverager.rpc_aggregate_part": "06ad9597d5884df8",  # wrapped
    "hivemind.averaging.averager.DecentralizedAverager.rpc_download_state": "fd2f6f19e7d247af",  # wrapped
    "hivemind.averaging.averager.DecentralizedAverager._aggregate_with_group": "c297d8a435ce2b1c",  # skipped for outsiders
    "hivemind.averaging.averager.DecentralizedAverager._step": "dfbb4416e9ebba51",  # its matchmaking is wrapped there
    "hivemind.averaging.matchmaking.Matchmaking._request_join_group": "df823040a94d1c1d",  # wrapped: None = refused
    "hivemind.averaging.matchmaking.Matchmaking._request_join_potential_leaders": "7cbff4ef7c029aec",  # asks the next
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``): the RPCs it wraps."""

REFUSED_KINDS = ("join", "leader", "part", "download", "group", "record", "shard")
"""What a refusal was of: a join request, a leader this peer did not ask to join, an all-reduce part, a state
download (asked of this peer, or a donor it did not ask), a group this peer left before its all-reduce, a peer whose
DHT records a reader skipped, a shard server call."""
REFRESH_SECONDS = 1.0
"""An unknown peer id makes the list read the DHT again, at most this often (an unknown caller waits for it)."""

_refused = mp.Array(ctypes.c_int64, len(REFUSED_KINDS))  # counted in the averagers' processes (forked later)


def renew_counters() -> None:
    """Counters of this process's own, shared with the averagers it forks from now on (``forks.py``)."""
    global _refused
    _refused = mp.Array(ctypes.c_int64, len(REFUSED_KINDS))


def refused_calls() -> dict[str, int]:
    """Refusals of peers without a valid token by this process and its averagers, since start, by kind."""
    return dict(zip(REFUSED_KINDS, _refused[:], strict=True))


class AccessList:
    """The peers a private run admits now: those with a valid token published under the run's access ``key``.

    ``check(value)`` reads one published value: the peer id it admits and until when (Unix time), or raises
    ``ValueError`` saying why it admits nobody (``protocols/access.token_checker``: a token the run's owner signed
    for this run)."""

    def __init__(self, key: str, check: Callable[[object], tuple[str, float]], dht: DHT, *, clock=time.time):
        self.key, self.check, self.dht = key, check, dht
        """``dht``: the node of the process that makes the list; the averagers it forks read through it too."""
        self._clock = clock
        self._expires: dict[str, float] = {}
        self._read_at = -float("inf")  # time.monotonic() at which the last read began
        self._reading: asyncio.Future | None = None
        self._logged: set[tuple[str, str]] = set()
        self.skipped = 0
        """Published values that admit nobody (not signed by the owner, another run's, expired, malformed)."""

    def holds_token(self, peer_id: PeerID | bytes | str) -> bool:
        return self._expires.get(_b58(peer_id), 0.0) > self._clock()

    def take(self, found: ValueWithExpiration | None) -> None:
        """Take the tokens of one read of the run's access key (``dht.get(key, latest=True)``)."""
        records = found.value if found is not None and isinstance(found.value, dict) else {}
        now = self._clock()
        for item in records.values():
            try:
                peer_id, expires_at = self.check(getattr(item, "value", None))
            except ValueError:
                self.skipped += 1
                continue
            if expires_at <= now:
                self.skipped += 1
            elif expires_at > self._expires.get(peer_id, 0.0):
                self._expires[peer_id] = expires_at

    def read(self) -> None:
        """Read the run's tokens now (blocking; not from inside an event loop)."""
        self._read_at = time.monotonic()
        self.take(self.dht.get(self.key, latest=True))

    def admits(self, peer_id: PeerID | str) -> bool:
        """Whether ``peer_id`` holds a valid token, reading the DHT again if it is unknown and the last read is
        :data:`REFRESH_SECONDS` old (blocking: a reader of records, which reads them again later)."""
        if not self.holds_token(peer_id) and time.monotonic() - self._read_at >= REFRESH_SECONDS:
            self.read()
        return self.holds_token(peer_id)

    async def admits_async(self, peer_id: PeerID | str) -> bool:
        """:meth:`admits` from an event loop (an averager's, a shard server's). An unknown peer waits for a read of
        the DHT that began after it was asked about (a peer that has just published its token is admitted at its
        first call); reads are shared by concurrent misses and at most one per :data:`REFRESH_SECONDS`, however
        many strangers call."""
        if self.holds_token(peer_id):
            return True
        asked = time.monotonic()
        while self._read_at < asked:  # no read has begun since: wait for the next one
            if self._reading is None or self._reading.done():
                self._reading = asyncio.ensure_future(self._read_async())
            try:
                await asyncio.shield(self._reading)
            except Exception as e:  # noqa: BLE001 (a DHT that failed to answer: the peer stays unknown)
                logger.debug(f"reading the access tokens under {self.key!r} failed: {e!r}")
                break
        return self.holds_token(peer_id)

    async def _read_async(self) -> None:
        if (wait := self._read_at + REFRESH_SECONDS - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        self._read_at = time.monotonic()
        self.take(await self.dht.get(self.key, latest=True, return_future=True))

    def refuse(self, kind: str, peer_id: PeerID | bytes | str, *, once: bool = False) -> None:
        """Count a refusal of ``peer_id``, logged once per peer and kind; ``once``: counted once too (records,
        which readers meet again at every read)."""
        key = (kind, _b58(peer_id))
        if once and key in self._logged:
            return
        with _refused.get_lock():
            _refused[REFUSED_KINDS.index(kind)] += 1
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(
                f"private run ({self.key}): refused {kind} of peer {key[1]}: it holds no valid access token"
            )


_access: AccessList | None = None


def admit_with(access: AccessList | None) -> None:
    """Make this process, and the averagers it starts from now on (forked), admit only peers ``access`` admits;
    None: everyone (a public run)."""
    global _access
    _access = access


def access_in_use() -> AccessList | None:
    return _access


async def admitted(peers: Iterable[PeerID]) -> list[PeerID]:
    """The peers of ``peers`` that the run admits, in order; each other one counted as a refused download."""
    peers = list(peers)
    if _access is None:
        return peers
    kept = []
    for peer in peers:
        if await _access.admits_async(peer):
            kept.append(peer)
        else:
            _access.refuse("download", peer)
    return kept


def admitted_records(metadata):
    """A read of hivemind's progress key with the records of peers that hold no token left out (each peer counted
    once): their samples do not count towards a global step, nor they as peers of the swarm. A record counts as its
    signer's (``keys.peer_id_of_owner`` of its subkey), whatever peer id it names."""
    if _access is None or not isinstance(metadata, dict):
        return metadata
    kept = {}
    for subkey, entry in metadata.items():
        signer = peer_id_of_owner(subkey) if isinstance(subkey, bytes) else None
        if signer is not None and _access.holds_token(signer):
            kept[subkey] = entry
        else:
            _access.refuse("record", signer or "an unsigned record", once=True)
    return kept


class GatedAveraging(DecentralizedAverager):
    """An averager of a private run: see the module docstring. Comes before ``rounds.CheckedRounds`` and
    ``kept_groups.KeptGroups`` in an averager's MRO, so a refused group is neither averaged nor kept."""

    async def _admits(self, context: P2PContext, kind: str) -> bool:
        if _access is None or await _access.admits_async(context.remote_id):
            return True
        _access.refuse(kind, context.remote_id)
        return False

    async def _step(self, *, step, future_for_init):
        matchmaking = self._matchmaking
        if _access is not None and not getattr(matchmaking, "potluck_gated", False):
            ask = matchmaking._request_join_group

            async def request_join_group(leader: PeerID):
                # None: as a leader that refused; hivemind's matchmaking asks its next leader
                if await _access.admits_async(leader):
                    return await ask(leader)
                _access.refuse("leader", leader)
                return None

            matchmaking._request_join_group = request_join_group
            matchmaking.potluck_gated = True
        return await super()._step(step=step, future_for_init=future_for_init)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._admits(context, "join"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.NOT_LOOKING_FOR_GROUP)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if not await self._admits(context, "part"):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._admits(context, "download"):
            return  # an empty stream: the newcomer asks its next donor
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _aggregate_with_group(self, group_info, *args, **kwargs):
        if _access is not None:
            outsiders = [
                peer
                for peer in group_info.peer_ids
                if peer != self.peer_id and not await _access.admits_async(peer)
            ]
            if outsiders:
                for peer in outsiders:
                    _access.refuse("group", peer)
                self._running_groups[group_info.group_id].cancel()  # no runner: nobody sends parts
                return {**CheckedRounds._gathered_by_peer(self, group_info), PARTIAL: 0.0}
        return await super()._aggregate_with_group(group_info, *args, **kwargs)


def _b58(peer_id: PeerID | bytes | str) -> str:
    if isinstance(peer_id, bytes):
        peer_id = PeerID(peer_id)
    return peer_id.to_base58() if isinstance(peer_id, PeerID) else str(peer_id)
