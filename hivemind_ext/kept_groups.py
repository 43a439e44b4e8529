"""Kept groups: the next round of the same peers, formed without matchmaking (issue 21).

hivemind forms every round's group by matchmaking in the DHT, which takes at least ``matchmaking_time`` (0.5 s and
more) and, for DiLoCo, came after a wait for every peer's "ready" to reach the DHT: 1.4 s of critical path per
outer round at 4 replicas, where torchft's lighthouse forms its quorum in 10-100 ms. When the peers of the last
round's group are the whole swarm again, they need no search: they re-form that group directly.

How: every member of the last round's group checks in with the group's *keeper* (its first member that accepts
connections: a client-mode peer cannot) when its next round starts, sending what it gathers for the round. Once
every member has checked in, the keeper answers each with the group: the same peers in the same order, a group id
derived from the last one and the round's key, and what each member gathered. The check-ins are the barrier:
nobody polls the DHT for the others' progress, and the all-reduce starts as soon as the last member is ready.

Whatever changed goes back to matchmaking, for every member at once (the keeper's answer is the one decision, so
the members never split between a kept round and a search):
    - a member asks for it (``keep`` false in what it gathers: it sees a peer outside the group, or its last round
      failed): the keeper answers every member "search" at once, and every later check-in too;
    - a member has not checked in ``wait`` seconds after the first did (it died, or is far behind): "search";
    - the keeper cannot be reached (it left): each member searches on its own.
A member checks in only for the round right after the one its last group was for (group keys that count rounds:
``rounds.round_bits``); a peer back from a download or a failed search goes straight to matchmaking, and a member
that still expects it is released by the others' "search" or by ``wait``.

Only members of the keeper's last group are heard (a check-in from another peer is answered "search" and
counted), and what a member sends is bounded in size, like every other request (``allreduce.py``).
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass, field

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2

from potluck.hivemind_ext.rounds import ROUND_BITS

logger = logging.getLogger(__name__)

UPSTREAM = {
    "hivemind.averaging.averager.DecentralizedAverager._step": "dfbb4416e9ebba51",  # calls _matchmaking.look_for_group, which this module wraps
    "hivemind.averaging.averager.DecentralizedAverager._aggregate_with_group": "c297d8a435ce2b1c",  # overridden: records the group
    "hivemind.averaging.averager.DecentralizedAverager.rpc_aggregate_part": "06ad9597d5884df8",  # waits for a group registered late
    "hivemind.averaging.matchmaking.Matchmaking.look_for_group": "05121895c7266059",  # wrapped
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""

MAX_GATHER_BYTES = 64 * 1024
"""The most a check-in may carry as its gathered data (a member gathers a few numbers)."""
DECIDED_KEPT_SECONDS = 60.0
"""How long the keeper remembers a decided round (for a member whose check-in comes late)."""
KEEP = "keep"
"""The key of the caller's gathered mapping that asks for the kept group (True) or for a search (False)."""


@dataclass
class _CheckIns:
    """The check-ins of one kept round, held by its keeper."""

    members: tuple[PeerID, ...]
    gathered: dict[PeerID, bytes] = field(default_factory=dict)
    decided: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """The group (a GroupInfo), or None: search."""
    since: float = field(default_factory=time.monotonic)


class KeptGroups(DecentralizedAverager):
    """Re-forms the last round's group without matchmaking when its members all ask for it (module docstring).

    ``kept_group_wait`` (seconds) bounds how long the keeper waits for the last member after the first checked
    in; the caller's round timeout must leave matchmaking its time after that. The caller says in its gathered
    mapping whether it asks to keep the group (:data:`KEEP`)."""

    _rpc_handlers = None  # collected for this class (hivemind caches them on the first class it meets)

    _last_group: GroupInfo | None = None
    _last_bits: str | None = None
    _round_bits: str | None = None
    _kept: dict[bytes, _CheckIns] | None = None

    def __init__(self, *args, kept_group_wait: float = 15.0, **kwargs):
        self.kept_group_wait = kept_group_wait
        self._kept_rounds = mp.Value(
            ctypes.c_int64, 0
        )  # counted in the averager's process, read in the caller's
        self._refused_check_ins = mp.Value(ctypes.c_int64, 0)
        super().__init__(*args, **kwargs)

    @property
    def kept_rounds(self) -> int:
        """Rounds of this averager that ran in a kept group."""
        return self._kept_rounds.value

    @property
    def refused_check_ins(self) -> int:
        """Check-ins this peer refused as a keeper (not from a member of its last group, or malformed)."""
        return self._refused_check_ins.value

    async def _step(self, *, step: StepControl, future_for_init):
        if self._kept is None:
            self._kept = {}
            search = self._matchmaking.look_for_group

            async def look_for_group(step: StepControl):
                self._round_bits = self._matchmaking.group_key_manager.group_bits
                group = await self._kept_group(step)
                return group if group is not None else await search(step)

            self._matchmaking.look_for_group = look_for_group
        return await super()._step(step=step, future_for_init=future_for_init)

    async def _aggregate_with_group(self, group_info: GroupInfo, *args, **kwargs):
        self._last_group, self._last_bits = group_info, self._round_bits
        return await super()._aggregate_with_group(group_info, *args, **kwargs)

    # -- a member ---------------------------------------------------------------------------------------------
    async def _kept_group(self, step: StepControl) -> GroupInfo | None:
        """The kept group for this round, or None: search (nothing to keep, or the keeper said so)."""
        last = self._last_group
        if last is None or not _follows(self._last_bits, self._round_bits):
            return None
        keep = self._asks_to_keep(step.data_for_gather)
        kept_id = self._kept_id(last, self._round_bits)
        keeper = _keeper(self, last)
        if keeper is None:
            return None
        if keeper == self.peer_id:
            group = await self._check_in(kept_id, last, self.peer_id, step.data_for_gather, keep)
        else:
            request = averaging_pb2.JoinRequest(
                schema_hash=self.schema_hash,
                group_key=kept_id.hex(),
                gather=step.data_for_gather,
                client_mode=self.client_mode,
            )
            try:
                stub = type(self).get_stub(self._p2p, keeper, namespace=self.prefix)
                answer = await stub.rpc_kept_group(request, timeout=self.kept_group_wait + 5.0)
            except Exception as e:  # noqa: BLE001 (the keeper left or hung: search)
                logger.info(f"kept group: its keeper {keeper} did not answer ({e!r}); matchmaking")
                return None
            group = _group_from(answer, self.peer_id)
        if group is not None:
            with self._kept_rounds.get_lock():
                self._kept_rounds.value += 1
        return group

    def _asks_to_keep(self, data_for_gather: bytes) -> bool:
        try:
            _, _, user = self.serializer.loads(data_for_gather)
            return bool(self.serializer.loads(user).get(KEEP, False))
        except Exception:  # noqa: BLE001 (a caller that gathers no mapping never asks)
            return False

    def _kept_id(self, last: GroupInfo, bits: str) -> bytes:
        return hashlib.sha256(last.group_id + bits.encode() + self.schema_hash).digest()[:20]

    # -- the keeper -------------------------------------------------------------------------------------------
    async def rpc_kept_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> averaging_pb2.MessageFromLeader:
        """A member of this peer's last group checks in for the kept round ``request.group_key``."""
        last, sender = self._last_group, context.remote_id
        search = averaging_pb2.MessageFromLeader(code=averaging_pb2.GROUP_DISBANDED)
        try:
            kept_id = bytes.fromhex(request.group_key)
        except ValueError:
            kept_id = b""
        if (
            last is None
            or self._kept is None
            or sender not in last.peer_ids
            or _keeper(self, last) != self.peer_id
            or request.schema_hash != self.schema_hash
            or len(kept_id) != 20
            or len(request.gather) > MAX_GATHER_BYTES
        ):
            with self._refused_check_ins.get_lock():
                self._refused_check_ins.value += 1
            return search
        group = await self._check_in(
            kept_id, last, sender, request.gather, self._asks_to_keep(request.gather)
        )
        if group is None:
            return search
        return averaging_pb2.MessageFromLeader(
            code=averaging_pb2.BEGIN_ALLREDUCE,
            group_id=group.group_id,
            ordered_peer_ids=[peer.to_bytes() for peer in group.peer_ids],
            gathered=list(group.gathered),
        )

    async def _check_in(
        self, kept_id: bytes, last: GroupInfo, member: PeerID, gathered: bytes, keep: bool
    ) -> GroupInfo | None:
        """Record ``member``'s check-in; the group once every member has checked in, None (search) when one asks
        to search or ``kept_group_wait`` passes first."""
        self._forget_old_rounds()
        check_ins = self._kept.setdefault(kept_id, _CheckIns(last.peer_ids))
        if check_ins.decided.done():
            return check_ins.decided.result()
        check_ins.gathered[member] = gathered
        if not keep:
            check_ins.decided.set_result(None)
        elif set(check_ins.gathered) == set(check_ins.members):
            check_ins.decided.set_result(
                GroupInfo(kept_id, check_ins.members, tuple(check_ins.gathered[p] for p in check_ins.members))
            )
        left = self.kept_group_wait - (time.monotonic() - check_ins.since)
        try:
            return await asyncio.wait_for(asyncio.shield(check_ins.decided), timeout=max(left, 0.0))
        except asyncio.TimeoutError:
            if not check_ins.decided.done():
                missing = [str(p) for p in check_ins.members if p not in check_ins.gathered]
                logger.info(
                    f"kept group: {missing} did not check in within {self.kept_group_wait:g} s; matchmaking"
                )
                check_ins.decided.set_result(None)
            return check_ins.decided.result()

    def _forget_old_rounds(self) -> None:
        now = time.monotonic()
        for kept_id, check_ins in list(self._kept.items()):
            if now - check_ins.since > self.kept_group_wait + DECIDED_KEPT_SECONDS:
                if not check_ins.decided.done():
                    check_ins.decided.set_result(None)
                del self._kept[kept_id]


def _follows(last_bits: str | None, bits: str | None) -> bool:
    """Whether group key bits ``bits`` are for the round right after ``last_bits`` (``rounds.round_bits``)."""
    if not last_bits or not bits or len(last_bits) != ROUND_BITS or len(bits) != ROUND_BITS:
        return False
    return (int(last_bits, 2) + 1) % 2**ROUND_BITS == int(bits, 2)


def _keeper(averager: DecentralizedAverager, group: GroupInfo) -> PeerID | None:
    """The first member of ``group`` that accepts connections (what it gathered says its mode)."""
    for peer, data in zip(group.peer_ids, group.gathered, strict=True):
        try:
            _, mode, _ = averager.serializer.loads(data)
        except Exception:  # noqa: BLE001
            continue
        if AveragingMode(mode) != AveragingMode.CLIENT:
            return peer
    return None


def _group_from(answer: averaging_pb2.MessageFromLeader, own: PeerID) -> GroupInfo | None:
    if answer.code != averaging_pb2.BEGIN_ALLREDUCE:
        return None
    peers = tuple(PeerID(raw) for raw in answer.ordered_peer_ids)
    if own not in peers or len(peers) != len(answer.gathered) or len(answer.group_id) != 20:
        return None
    return GroupInfo(answer.group_id, peers, tuple(answer.gathered))
