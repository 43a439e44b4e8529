"""Followers that wait for their leader's answer as long as the leader's all-reduce waits for them.

In hivemind 1.1.12 a follower accepted into a leader's group waits for the group (``BEGIN_ALLREDUCE``) until its own
matchmaking expiration plus ``request_timeout``, and the leader assembles the group at *its* expiration, which is no
later than the follower's. When both peers started looking at the same time (hivemind's optimizer schedules rounds
by the same estimate of the next step), the margin is ``request_timeout`` alone: 0.25 s at the default 0.5 s of
matchmaking, and it must stay under half the matchmaking time, or two peers asking each other deadlock
(``RunSpec.averaging.request_timeout``). A leader's event loop that is busy for that long (its own requests to other
leaders hold the lock it needs to assemble; a loaded machine) sent the group 2 ms after its follower gave up: the
leader then ran the round with a member that never came (its reducer got 50 % of the parts after the sender timeout,
the round's average was partial), and the follower found no group until the step's deadline, 14 s later, while the
other peer, whose state round ended, had nobody to look with. Two peers on an idle loopback swarm met this in 3 of 4
runs of 40 steps.

Only the wait for the group changes: once accepted, a follower holds no lock, so waiting longer cannot deadlock, and a
leader that died closes the stream at once. It waits as long as the leader's all-reduce waits for a member's first
part (``sender_timeout``): a follower that gets the group that late still starts in time to be counted in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator  # noqa: UP035 (the type of hivemind's stream, as upstream spells it)

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.p2p import P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import anext

logger = logging.getLogger(__name__)

UPSTREAM = {
    "hivemind.averaging.matchmaking.Matchmaking._request_join_group": "df823040a94d1c1d",  # copied, one wait longer
    "hivemind.averaging.averager.DecentralizedAverager._step": "dfbb4416e9ebba51",  # creates the matchmaking this patches
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""


class PatientFollowers(DecentralizedAverager):
    """An averager whose matchmaking, as a follower, waits for the group up to the all-reduce's sender timeout past
    its expiration (module docstring). Comes before ``access.GatedAveraging`` in an averager's MRO: that class wraps
    whatever joins a group, and the wrapper must call this one."""

    async def _step(self, *, step, future_for_init):
        matchmaking = self._matchmaking
        if not getattr(matchmaking, "potluck_patient", False):
            if getattr(matchmaking, "potluck_gated", False):
                raise TypeError(f"{type(self).__name__}: PatientFollowers must come before GatedAveraging")
            grace = max(matchmaking.request_timeout, self.allreduce_kwargs.get("sender_timeout") or 0.0)

            async def request_join_group(leader: PeerID) -> GroupInfo | None:
                return await join_group(matchmaking, leader, grace)

            matchmaking._request_join_group = request_join_group
            matchmaking.potluck_patient = True
        return await super()._step(step=step, future_for_init=future_for_init)


async def join_group(self: Matchmaking, leader: PeerID, grace: float) -> GroupInfo | None:
    """``Matchmaking._request_join_group`` of hivemind 1.1.12 with one change, marked: after being accepted, wait
    for the group until this peer's expiration plus ``grace`` (upstream: plus ``request_timeout``). A redirect to
    another leader goes through ``self._request_join_group``, as upstream's does (this function, installed)."""
    assert self.is_looking_for_group and self.current_leader is None
    stream: AsyncIterator[averaging_pb2.MessageFromLeader] | None = None
    try:
        async with self.lock_request_join_group:
            leader_stub = self._servicer_type.get_stub(self._p2p, leader, namespace=self._prefix)
            request_expiration_time = self.get_request_expiration_time()
            stream = await leader_stub.rpc_join_group(
                averaging_pb2.JoinRequest(
                    schema_hash=self.schema_hash,
                    expiration=request_expiration_time,
                    client_mode=self.client_mode,
                    gather=self.step_control.data_for_gather,
                    group_key=self.group_key_manager.current_key,
                )
            )
            message = await asyncio.wait_for(anext(stream), timeout=self.request_timeout)

            if message.code == averaging_pb2.ACCEPTED:
                logger.debug(f"{self.peer_id} - joining the group of {leader}, waiting for peers")
                self.current_leader = leader
                self.was_accepted_to_group.set()
                if len(self.current_followers) > 0:
                    await self.leader_disband_group()

        if message.code != averaging_pb2.ACCEPTED:
            code = averaging_pb2.MessageCode.Name(message.code)
            logger.debug(f"{self.peer_id} - requested {leader} to be my leader, but got rejected with {code}")
            return None

        async with self.potential_leaders.pause_search():
            time_to_expiration = max(0.0, request_expiration_time - get_dht_time())
            # CHANGED: upstream waits time_to_expiration + self.request_timeout
            message = await asyncio.wait_for(anext(stream), time_to_expiration + grace)

            if message.code == averaging_pb2.BEGIN_ALLREDUCE:
                async with self.lock_request_join_group:
                    return await self.follower_assemble_group(leader, message)

        if message.code in (averaging_pb2.GROUP_DISBANDED, averaging_pb2.CANCELLED):
            if message.suggested_leader:
                suggested_leader = PeerID(message.suggested_leader)
                if suggested_leader != self.peer_id:
                    logger.debug(f"{self} - leader disbanded group and redirected us to {suggested_leader}")
                    self.current_leader = None
                    try:
                        await stream.aclose()
                    except RuntimeError as e:
                        logger.debug(e, exc_info=True)
                    return await self._request_join_group(suggested_leader)
            logger.debug(f"{self} - leader disbanded group")
            return None

        logger.debug(
            f"{self} - unexpected message from leader: {averaging_pb2.MessageCode.Name(message.code)}"
        )
        return None
    except asyncio.TimeoutError:
        logger.debug(f"{self} - potential leader {leader} did not respond in time")
        return None
    except (P2PDaemonError, P2PHandlerError, StopAsyncIteration):
        logger.debug(f"{self} - failed to request potential leader {leader}:", exc_info=True)
        return None

    finally:
        self.was_accepted_to_group.clear()
        self.current_leader = None
        if stream is not None:
            try:
                await stream.aclose()
            except RuntimeError as e:
                logger.debug(e, exc_info=True)
