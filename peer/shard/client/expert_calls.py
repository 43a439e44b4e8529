"""Which expert server to call for an expert, and the fault rule when it does not answer.

The trainer finds servers in the DHT (``protocols/experts.read_experts``, re-read at most every
``refresh_seconds``) and calls the experts of one MoE layer all at once. **Fault rule**, per expert call (one
expert, the tokens routed to it):

1. try the expert's servers in turn, best first: the one that answered this expert last, unless it announces a
   ``load`` of at least ``BUSY_LOAD``; then by spare throughput (announced throughput × (1 − load)); a server that
   fails, times out, is busy or refuses the call as malformed (``bad_request``) is banned for ``ban_seconds`` and the
   next one tried;
   an answer from another server than the one that answered the expert last, because that one failed (in this
   call or, banned, before it), counts as ``rerouted``;
2. when none answers, the call is ``dropped``: the expert's output is left out for those tokens and their
   remaining gates are renormalised to sum to one (``remote_experts.renormalised``); a token whose every expert was
   dropped passes the layer through its residual alone;
3. a backward call goes to the server that answered forward, else to a replica (backward is stateless: the
   server recomputes the forward pass); when none answers, ``backward_dropped``: those tokens get no gradient
   through that expert, and the expert does not learn from them.

With a layer's backward calls go its **idle steps**: each expert of the layer that the batch routed no token to
takes a step on a zero gradient at its first candidate server (one request per server), as local training's
optimizer steps every expert at every step, on momentum alone when it got no token. So every backward pass steps
every expert once, and the servers train what one AdamW over the local model would. An idle step that fails, for
any reason (a refusal too: it is a best-effort step, and a server's word on what is malformed is not trusted to
stop training), is counted (``idle_steps_failed``, one failure per request) and its server banned; it is not
retried on a replica.

A call refused as malformed (``bad_request``) is the caller's bug only when a second, different server refuses it
too, or when no other server of the expert is left to ask: then it is raised, naming each refusing server's answer
(:mod:`.refusals`); one server's word is not enough to stop training. Counts are in :class:`ExpertClientMetrics`
(refusals also under ``refused`` and ``refused_by_expert``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import torch
from hivemind.dht import DHT
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

from potluck.peer.shard import wire
from potluck.peer.shard.client.refusals import Refusals, is_refusal
from potluck.peer.shard.metrics import ExpertClientMetrics
from potluck.peer.shard.server.expert_service import ExpertServicer
from potluck.peer.shard.transport import Transport
from potluck.protocols.experts import ExpertAnnouncement, expert_uid, read_experts

logger = logging.getLogger(__name__)

BUSY_LOAD = 0.9
"""An expert's last server that announces at least this share of its time busy loses the expert's tokens to the
replica with the most spare throughput (one without replicas keeps them)."""


def spare_throughput(server: ExpertAnnouncement) -> float:
    """Tokens per second a server has left for more work, by its own announcement."""
    return server.throughput * (1.0 - server.load)


class ExpertDirectory:
    """The online servers of every expert of a run, from the DHT, and the bans of those that failed."""

    def __init__(self, dht: DHT, run_id: str, refresh_seconds: float = 2.0, ban_seconds: float = 60.0):
        self.dht, self.run_id = dht, run_id
        self.refresh_seconds, self.ban_seconds = refresh_seconds, ban_seconds
        self.servers: dict[str, ExpertAnnouncement] = {}
        self._read_at = -float("inf")
        self._banned_until: dict[str, float] = {}
        self.last_good: dict[str, str] = {}
        """By expert uid: the server that answered it last."""

    def refresh(self, force: bool = False) -> None:
        if force or time.monotonic() - self._read_at > self.refresh_seconds:
            found = read_experts(self.dht, self.run_id).records.values()
            self.servers = {a.peer_id: a for a in found if a.state == "online"}
            self._read_at = time.monotonic()

    def candidates(self, uid: str) -> list[str]:
        """Peer ids serving ``uid`` and not banned, best first."""
        now = time.monotonic()
        serving = [
            a for a in self.servers.values() if uid in a.uids and self._banned_until.get(a.peer_id, 0) < now
        ]
        last = self.last_good.get(uid)
        serving.sort(
            key=lambda a: (not (a.peer_id == last and a.load < BUSY_LOAD), -spare_throughput(a), a.peer_id)
        )
        return [a.peer_id for a in serving]

    def covers(self, uids: list[str]) -> bool:
        """Every expert in ``uids`` has a server (after a fresh read)."""
        self.refresh(force=True)
        return all(self.candidates(uid) for uid in uids)

    def banned(self, peer_id: str) -> bool:
        return self._banned_until.get(peer_id, 0) >= time.monotonic()

    def ban(self, peer_id: str) -> None:
        self._banned_until[peer_id] = time.monotonic() + self.ban_seconds

    def unban(self, peer_id: str) -> None:
        self._banned_until.pop(peer_id, None)

    def addresses_of(self, peer_id: str) -> list[str]:
        found = self.servers.get(peer_id)
        return list(found.addresses) if found is not None else []


class ExpertClient:
    """Calls experts of a run through their servers, applying the fault rule. Tune ``request_timeout`` to the
    slowest expert call you expect: a dead server costs at most this per attempt."""

    def __init__(self, dht: DHT, run_id: str, request_timeout: float = 10.0, ban_seconds: float = 60.0):
        self.request_timeout = request_timeout
        self.directory = ExpertDirectory(dht, run_id, ban_seconds=ban_seconds)
        self.p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        self.transport = Transport(self.p2p, ExpertServicer, self.directory.addresses_of)
        self.metrics = ExpertClientMetrics()

    def forward(
        self, layer: int, inputs: dict[int, torch.Tensor]
    ) -> dict[int, tuple[torch.Tensor | None, str]]:
        """Each expert of ``layer`` on its tokens ``[tokens, hidden]``, all at once: by expert, its output (None:
        dropped) and the server that answered."""
        self.directory.refresh()
        for expert, hidden in inputs.items():
            uid = expert_uid(layer, expert)
            self.metrics.tokens_by_expert[uid] = self.metrics.tokens_by_expert.get(uid, 0) + hidden.shape[0]
        calls = [self._call(expert_uid(layer, e), "forward", [x]) for e, x in inputs.items()]
        answers = dict(zip(inputs, RemoteExpertWorker.run_coroutine(_gather(calls)), strict=True))
        for expert, (output, _) in answers.items():
            if output is None:
                self.metrics.dropped += 1
                self.metrics.dropped_tokens += inputs[expert].shape[0]
        return answers

    def backward(
        self,
        layer: int,
        inputs: dict[int, tuple[torch.Tensor, torch.Tensor]],
        served_by: dict[int, str],
        idle: list[int] | None = None,
    ) -> dict[int, torch.Tensor | None]:
        """The gradient of each expert's input, given its input and output gradient (None: no server answered);
        with them, an idle step for each expert of ``idle`` (those the batch routed no token to)."""
        calls = [
            self._call(expert_uid(layer, e), "backward", list(pair), served_by.get(e))
            for e, pair in inputs.items()
        ]
        answers, _ = RemoteExpertWorker.run_coroutine(
            _gather([_gather(calls), self._idle_steps(layer, idle or [])])
        )
        self.metrics.backward_dropped += sum(grad is None for grad, _ in answers)
        return {expert: grad for expert, (grad, _) in zip(inputs, answers, strict=True)}

    async def _idle_steps(self, layer: int, experts: list[int]) -> None:
        by_server: dict[str, list[str]] = {}
        for expert in experts:
            uid = expert_uid(layer, expert)
            candidates = self.directory.candidates(uid)
            if candidates:
                by_server.setdefault(candidates[0], []).append(uid)
            else:
                self.metrics.idle_steps_failed += 1
        await asyncio.gather(*(self._idle_step(peer_id, uids) for peer_id, uids in by_server.items()))

    async def _idle_step(self, peer_id: str, uids: list[str]) -> None:
        started = time.perf_counter()
        self.metrics.requests += 1
        try:
            reply = await self.transport.call(
                peer_id, "idle_steps", wire.request([], uids=uids), self.request_timeout
            )
            wire.unpack_response(reply)
        except Exception as e:  # noqa: BLE001 (any refusal, even "bad_request": a best-effort step, never fatal)
            # one request: one failure, one ban; each expert in it missed its step
            self.metrics.idle_steps_failed += len(uids)
            for uid in uids:
                self._count_expert_failure(uid, e)
            self._failed_request(peer_id, started, f"idle steps of {', '.join(uids)}", e)
        else:
            self.metrics.idle_steps += len(uids)

    async def _call(
        self, uid: str, method: str, tensors: list[torch.Tensor], preferred: str | None = None
    ) -> tuple[torch.Tensor | None, str]:
        candidates = self.directory.candidates(uid)
        previous = self.directory.last_good.get(uid)
        if preferred in candidates:
            candidates.remove(preferred)
            candidates.insert(0, preferred)
        refusals = Refusals(f"{method} of expert {uid}", self.directory.unban)
        for attempt, peer_id in enumerate(candidates):
            started = time.perf_counter()
            self.metrics.requests += 1
            try:
                reply = await self.transport.call(
                    peer_id, method, wire.request(tensors, uid=uid), self.request_timeout
                )
                (result,) = wire.unpack_response(reply)
                if result.shape != tensors[0].shape or not torch.isfinite(result).all():
                    raise wire.RemoteError(
                        f"answered a tensor of shape {tuple(result.shape)} or non-finite", "internal"
                    )
            except Exception as e:  # noqa: BLE001 (reset, timed out, refused: all mean the next server)
                self._failed(uid, peer_id, started, e)
                refusals.note(peer_id, e)  # raises a second server's refusal as the caller's bug
                continue
            # re-routed: the server that answered this expert before failed, in this call or in one before it
            self.metrics.rerouted += attempt > 0 or (
                previous not in (None, peer_id) and self.directory.banned(previous)
            )
            self.directory.last_good[uid] = peer_id
            return result, peer_id
        refusals.none_left()
        return None, ""

    def _failed(self, uid: str, peer_id: str, started: float, error: BaseException) -> None:
        self._count_expert_failure(uid, error)
        self._failed_request(peer_id, started, f"expert {uid}", error)

    def _count_expert_failure(self, uid: str, error: BaseException) -> None:
        """One failed request for expert ``uid`` (a refusal also under ``refused_by_expert``)."""
        metrics = self.metrics
        metrics.failures_by_expert[uid] = metrics.failures_by_expert.get(uid, 0) + 1
        if is_refusal(error):
            metrics.refused_by_expert[uid] = metrics.refused_by_expert.get(uid, 0) + 1

    def _failed_request(self, peer_id: str, started: float, what: str, error: BaseException) -> None:
        self.metrics.failures += 1
        self.metrics.refused += is_refusal(error)
        self.metrics.bans += 1
        self.metrics.retry_seconds += time.perf_counter() - started
        self.directory.ban(peer_id)
        logger.warning(f"{what} on {peer_id} failed: {error!r}; trying a replica or dropping it")

    def expert_state(self, peer_id: str, uid: str) -> tuple[list[torch.Tensor], int]:
        """A server's expert ``uid``: its weights (gate, up, down) and how many optimizer steps it has taken."""
        reply = RemoteExpertWorker.run_coroutine(
            self.transport.call(peer_id, "expert_state", wire.request([], uid=uid), self.request_timeout)
        )
        *state, steps = wire.unpack_response(reply)
        return state[:3], int(steps)  # then AdamW's statistics

    def shutdown(self) -> None:
        """Close this client's connection to the p2p daemon (before the DHT that runs it)."""
        with contextlib.suppress(Exception):
            RemoteExpertWorker.run_coroutine(self.p2p.shutdown())


async def _gather(calls):
    return await asyncio.gather(*calls)
