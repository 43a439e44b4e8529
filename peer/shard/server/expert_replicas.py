"""Expert servers that host the same expert keep it one expert: a server that starts late downloads the state of
its experts from a replica, and replicas average their experts at regular moments of the swarm's clock.

**Download at start.** Before it serves, a server asks every other online server of its experts (from the DHT,
``protocols/experts.read_experts``) for their step counts (``rpc_info``), and for each of its experts takes the
state of the replica furthest on (weights and AdamW statistics, ``rpc_expert_state``; streamed above the unary
cap) unless its own, resumed from its checkpoint, is further on. An expert no replica serves starts from the
checkpoint it resumed, else from the model's weights.

**Averaging rounds.** At each multiple of ``expert_replicas.average_every`` seconds of DHT time (the clock all
peers share) every server snapshots each of its experts that another online server also announces, then fetches
those replicas' snapshots of the same round (``rpc_expert_state`` with ``round``; a replica that has not taken
its snapshot yet answers ``busy`` and is asked again) until ``min(averaging.averaging_timeout, average_every / 2)``
has passed, and moves its expert to the mean of its own and the snapshots it got (weights and AdamW statistics),
summed in peer-id order, each weighted by the optimizer steps its replica took since its last round (or its
download, or its start; a snapshot carries it): trainers stick to the server that answered an expert last, so
one replica may take every step while another idles, and equal weights pulled the trained expert halfway back
to the idle copy at every round. An idle replica (weight 0) takes the others' expert; where all are idle, each
counts one. So replicas that got each other's snapshots hold the same expert to the bit when no
backward request landed during the round (``ServerSteps.move_to``); one that landed is kept on top. A replica
whose snapshot does not arrive is left out of that round (``partial``; the next round brings them together); a
snapshot of other shapes or with NaN or Inf is refused and counted. Snapshots are kept until the round's end.

NOTE: unlike trainers' and span adapters' rounds, these go over the expert servers' own RPC, not hivemind's
averager: a hivemind averager is a process per group of identical tensors, and replicas share single experts,
not whole sets (server ``a`` may hold experts 0-3, ``c`` only 1), so it would take a process per expert.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import torch
from hivemind.dht import DHT
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from potluck.hivemind_ext.aggregators import weighted_mean
from potluck.peer.shard import wire
from potluck.peer.shard.server.batching import ServerBusy
from potluck.peer.shard.server.expert_service import ExpertServicer, ServedExperts, Uid
from potluck.peer.shard.server.handling import BadRequest
from potluck.peer.shard.server.steps import ServerSteps, StateMismatch
from potluck.peer.shard.transport import Transport
from potluck.protocols.experts import ExpertAnnouncement, expert_uid, parse_uid, read_experts
from potluck.protocols.runspec import RunSpec
from potluck.runtime.periodic import Periodic

logger = logging.getLogger(__name__)


class Refused(ValueError):
    """A replica's state of other shapes, with NaN or Inf, or without a step count."""


RETRY_SECONDS = 0.2
"""How soon a replica that has not taken its round's snapshot yet is asked again."""


@dataclass(frozen=True)
class Downloaded:
    """An expert's state downloaded from a replica at start."""

    uid: str
    donor: str
    steps: int
    """The donor's optimizer steps of that expert."""
    adopted: bool
    """False when this server's own state (resumed from its checkpoint) was further on and was kept."""


class ExpertReplicas:
    """Downloads and averages the experts of ``served`` with their replicas. Create it once the server's p2p
    daemon runs; pass :meth:`round_state` to the servicer, call :meth:`download` before serving and :meth:`start`
    after."""

    def __init__(self, dht: DHT, p2p, spec: RunSpec, served: ServedExperts, metrics=None):
        self.dht, self.served, self.run_id, self.metrics = dht, served, spec.run_id, metrics
        self.peer_id = str(dht.peer_id)
        self.every = spec.expert_replicas.average_every
        self.round_seconds = min(spec.averaging.averaging_timeout, self.every / 2)
        self.request_timeout = spec.averaging.request_timeout
        self.download_timeout = spec.averaging.load_state_timeout
        self._announced: dict[str, ExpertAnnouncement] = {}
        self.transport = Transport(p2p, ExpertServicer, self._addresses_of)
        self._snapshots: dict[Uid, tuple[int, list[torch.Tensor], int, int]] = {}
        """By expert: the round, the state, its step count and its weight (steps since :attr:`_synced_at`)."""
        self._synced_at = {uid: steps.steps for uid, steps in served.steps.items()}
        """By expert: its step count when it last took its replicas' average or a downloaded state (or started)."""
        self._snapshots_lock = threading.Lock()
        self._periodic = Periodic(
            self.average_once, self.every, "expert-replica-averaging", aligned_to=get_dht_time
        )

    # -- who the replicas are ------------------------------------------------------------------------
    def replicas(self) -> dict[Uid, list[str]]:
        """By expert of this server that another online server announces: those servers' peer ids, sorted."""
        found = {
            a.peer_id: a for a in read_experts(self.dht, self.run_id).records.values() if a.state == "online"
        }
        found.pop(self.peer_id, None)
        self._announced = found
        replicas: dict[Uid, list[str]] = {}
        for peer_id, announcement in sorted(found.items()):
            for text in announcement.uids:
                uid = parse_uid(text)
                if uid in self.served.experts:
                    replicas.setdefault(uid, []).append(peer_id)
        return replicas

    def _addresses_of(self, peer_id: str) -> list[str]:
        found = self._announced.get(peer_id)
        return list(found.addresses) if found is not None else []

    # -- download at start ---------------------------------------------------------------------------
    def download(self) -> list[Downloaded]:
        """For each expert that a replica serves, the state of the replica furthest on, taken unless this one's
        is further on. Experts whose replicas do not answer keep their own state (logged and counted)."""
        replicas = self.replicas()
        if not replicas:
            return []
        peers = sorted({peer for serving in replicas.values() for peer in serving})
        steps_of = dict(zip(peers, self._run(*(self._steps_of(peer) for peer in peers)), strict=True))
        done = []
        for uid, serving in sorted(replicas.items()):
            text = expert_uid(*uid)
            offers = sorted(
                (peer for peer in serving if steps_of[peer]),
                key=lambda p: steps_of[p].get(text, -1),
                reverse=True,
            )
            got = None
            for peer in offers:  # furthest on first; the next one if it fails
                got = self._take(uid, peer)
                if got is not None:
                    break
            if got is None:
                logger.warning(
                    f"expert {text}: no replica of {serving} gave its state; serving this one's own"
                )
                self._count_download("failed")
                continue
            done.append(got)
            self._count_download("adopted" if got.adopted else "kept")
        return done

    async def _steps_of(self, peer: str) -> dict[str, int]:
        try:
            stub = await self.transport.stub(peer)
            info = await stub.rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=self.request_timeout)
            steps = MSGPackSerializer.loads(info.serialized_info).get("steps", {})
            return {k: v for k, v in steps.items() if isinstance(k, str) and type(v) is int and v >= 0}
        except Exception as e:  # noqa: BLE001 (an unreachable or malformed replica is skipped)
            logger.info(f"replica {peer} did not tell its experts' steps: {e!r}")
            return {}

    def _take(self, uid: Uid, peer: str) -> Downloaded | None:
        text = expert_uid(*uid)
        try:
            ((tensors, steps, _),) = self._run(self._fetch(uid, peer, None, self.download_timeout))
        except Exception as e:  # noqa: BLE001 (a replica that fails or sends a malformed state: the next one)
            logger.warning(f"expert {text}: the state from {peer} was not usable: {e}")
            return None
        served = self.served.steps[uid]
        with served.lock:
            if steps < served.steps:
                return Downloaded(text, peer, steps, adopted=False)
            served.adopt(tensors, steps, f"expert {text}'s state from {peer}")
            self._synced_at[uid] = steps
        return Downloaded(text, peer, steps, adopted=True)

    # -- averaging rounds ----------------------------------------------------------------------------
    def start(self) -> ExpertReplicas:
        self._periodic.start()
        return self

    def round_state(self, uid: Uid, round_: int) -> tuple[list[torch.Tensor], int, int]:
        """This server's snapshot of ``uid`` for round ``round_`` (the servicer's ``expert_state``): the state,
        its step count and its weight in the round."""
        with self._snapshots_lock:
            taken = self._snapshots.get(uid)
        if taken is None or taken[0] < round_:
            raise ServerBusy(f"round {round_}: not snapshot yet")
        if taken[0] > round_:  # not busy: the asker stops asking
            raise BadRequest(f"round: {round_} is over here (this server is at round {taken[0]})")
        return taken[1], taken[2], taken[3]

    def average_once(self) -> dict[Uid, str]:
        """One round for every replicated expert: its outcome by expert."""
        round_ = round(get_dht_time() / self.every)
        deadline = time.monotonic() + self.round_seconds
        replicas = self.replicas()
        if not replicas:
            return {}
        sent = {}
        for uid in replicas:
            steps = self.served.steps[uid]
            with steps.lock:
                sent[uid] = steps.snapshot()
            with self._snapshots_lock:
                self._snapshots[uid] = (round_, *sent[uid], sent[uid][1] - self._synced_at[uid])
        calls = [
            self._fetch_in_round(uid, peer, round_, deadline)
            for uid, peers in replicas.items()
            for peer in peers
        ]
        answers = iter(self._run(*calls)) if calls else iter(())
        outcomes = {}
        for uid, peers in replicas.items():
            parts = {self.peer_id: (sent[uid][0], sent[uid][1] - self._synced_at[uid])}
            refused = False
            for peer in peers:
                answer = next(answers)
                if isinstance(answer, Refused):
                    logger.warning(str(answer))
                    refused = True
                elif not isinstance(answer, BaseException):
                    parts[peer] = (answer[0], answer[2])
            outcomes[uid] = self._blend(uid, parts, sent[uid], len(peers) + 1, refused)
        if self._periodic.stopping.wait(max(deadline - time.monotonic(), 0)):
            return outcomes
        with (
            self._snapshots_lock
        ):  # the round is over for every replica: its snapshots are not asked for again
            for uid in replicas:
                if self._snapshots.get(uid, (None,))[0] == round_:
                    del self._snapshots[uid]
        return outcomes

    def _blend(
        self, uid: Uid, parts: dict, sent: tuple[list[torch.Tensor], int], members: int, refused: bool
    ) -> str:
        outcome = (
            "refused"
            if refused
            else "alone"
            if len(parts) == 1
            else "partial"
            if len(parts) < members
            else "averaged"
        )
        if len(parts) > 1:
            steps = self.served.steps[uid]
            with steps.lock:
                steps.move_to(mean_in_order(parts), sent[0], sent[1])
            # steps taken during the round are this replica's own until the next
            self._synced_at[uid] = sent[1]
        if self.metrics is not None:
            self.metrics.replica_rounds.labels(self.run_id, outcome).inc()
        if outcome != "averaged":
            logger.info(f"expert {expert_uid(*uid)}: round {outcome} ({len(parts)} of {members} replicas)")
        return outcome

    async def _fetch_in_round(self, uid: Uid, peer: str, round_: int, deadline: float):
        """The replica's snapshot of the round, asked again while it is busy, until ``deadline``; the exception
        otherwise (returned, not raised: one replica's failure is not the round's)."""
        while True:
            try:
                return await self._fetch(uid, peer, round_, max(deadline - time.monotonic(), 0.1))
            except wire.RemoteError as e:
                if e.kind != wire.BUSY or time.monotonic() + RETRY_SECONDS >= deadline:
                    return e
            except Exception as e:  # noqa: BLE001 (Refused, a timeout, a dead replica)
                return e
            await asyncio.sleep(RETRY_SECONDS)

    async def _fetch(
        self, uid: Uid, peer: str, round_: int | None, timeout: float
    ) -> tuple[list[torch.Tensor], int, int]:
        """The replica's state of ``uid``, its step count and (a round's snapshot; else 0) its weight."""
        text = expert_uid(*uid)
        message = wire.request([], uid=text) if round_ is None else wire.request([], uid=text, round=round_)
        reply = await self.transport.call(
            peer, "expert_state", message, timeout, response_bytes=self.served.state_bytes(uid) + 1024
        )
        source = f"the state of expert {text} from {peer}"
        unpacked = wire.unpack_response(reply)
        weight = unpacked.pop() if round_ is not None and unpacked else None
        tensors, steps = checked_state(
            unpacked[:-1], unpacked[-1] if unpacked else None, self.served.steps[uid], source
        )
        return (
            tensors,
            steps,
            0 if round_ is None else checked_count(weight, f"{source} has no weight", steps),
        )

    def _run(self, *calls):
        async def gather():
            return await asyncio.gather(*calls, return_exceptions=False)

        return RemoteExpertWorker.run_coroutine(gather())

    def _count_download(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.downloads.labels(self.run_id, outcome).inc()

    def shutdown(self) -> None:
        self._periodic.stop()


def mean_in_order(parts: dict[str, tuple[list[torch.Tensor], int]]) -> list[torch.Tensor]:
    """The mean of each tensor over the replicas' states ``parts`` (by peer id: the state and its weight), weighted
    (all weights 0: one each) and summed in peer-id order (in float32 at least), so every replica that has the same
    parts computes the same mean to the bit."""
    ordered = [parts[peer] for peer in sorted(parts)]
    weights = [float(weight) for _, weight in ordered]
    return [
        weighted_mean([t.to(torch.promote_types(t.dtype, torch.float32)) for t in column], weights).to(
            column[0].dtype
        )
        for column in zip(*(state for state, _ in ordered), strict=True)
    ]


def checked_state(
    tensors: list[torch.Tensor], steps: torch.Tensor | None, own: ServerSteps, source: str
) -> tuple[list[torch.Tensor], int]:
    """A replica's expert state, in this server's dtype, and its step count; :class:`Refused` naming ``source``
    when its tensors are not of this expert's shapes, hold NaN or Inf, or it carries no step count."""
    try:
        own.check_shapes(tensors, source)
    except StateMismatch as e:
        raise Refused(str(e)) from None
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise Refused(f"{source} holds NaN or Inf")
    count = checked_count(steps, f"{source} has no step count")
    dtype = own.state_tensors()[0].dtype
    return [t.to(dtype) for t in tensors], count


def checked_count(value: torch.Tensor | None, refusal: str, most: int | None = None) -> int:
    """``value`` as a count: one integer, at least 0 and at most ``most``; else :class:`Refused` (``refusal``)."""
    if value is None or value.numel() != 1 or value.is_floating_point() or value.is_complex():
        raise Refused(refusal)
    count = int(value)
    if count < 0 or (most is not None and count > most):
        raise Refused(refusal)
    return count
