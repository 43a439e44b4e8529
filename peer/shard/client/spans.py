"""Forward, backward and cached inference through remote block spans, with failover.

The client keeps the input it sent to every hop of a route. When a server fails or times out, it is
banned for a while, the affected span is re-routed (possibly over several replicas) and the kept
input is replayed there: mid-forward the pass continues from the failed span; mid-backward the
span's inputs are recomputed on the replicas and its gradient is taken there; mid-generation the
replica's attention cache is rebuilt from all the inputs that span received so far. A server that
refuses a request as malformed (``bad_request``) is banned and failed over in the same way (counted in
``refused``); the request is the caller's bug, raised naming each refusing server's answer, only when a
second, different server refuses the same blocks of the same pass too, or no other server is left to ask
(:mod:`.refusals`): one server's word does not stop a client.
A request too big for one hivemind unary message goes in chunks to the method's streaming twin
(:mod:`..streaming`), with the same failover.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field

import torch
from hivemind.dht import DHT
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from potluck.peer.shard import wire
from potluck.peer.shard.client.refusals import Refusals, is_refusal
from potluck.peer.shard.client.routing import ForgedAnnouncement, Hop, NoRouteError, Router
from potluck.peer.shard.metrics import ShardClientMetrics
from potluck.peer.shard.server.service import ShardServicer
from potluck.peer.shard.transport import Transport
from potluck.protocols.shards import SHARD_PROTOCOL_VERSION, ShardAnnouncement

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pass:
    """How a pass goes through the blocks, beyond its hidden states (see :mod:`wire`)."""

    position_offset: int = 0
    """Absolute position of the first token (after a prefix: its length)."""
    padding: list[int] | None = None
    """Each row's count of left pads; None: none."""
    prefix: torch.Tensor | None = None
    """Prefix tuning's keys and values for every block, ``[blocks, 2, key-value heads, tokens, head size]``."""
    adapter: bool = True
    """False: the servers leave their adapters out of this pass (a reference model's)."""

    def for_hop(self, hop: Hop) -> tuple[list[torch.Tensor], dict]:
        """The extra tensors and the metadata of a request to ``hop``."""
        metadata: dict = {"position_offset": self.position_offset}
        if self.padding is not None and any(self.padding):
            metadata["padding"] = self.padding
        if not self.adapter:
            metadata["adapter"] = False
        if self.prefix is None:
            return [], metadata
        prefix = self.prefix[hop.start : hop.end].detach().cpu()
        return [prefix], {**metadata, "prefix_tokens": prefix.shape[3]}


PLAIN = Pass()
"""A pass from position 0, without padding, prefix, or the servers' adapters turned off."""


class ServerFailure(RuntimeError):
    """A server failed, timed out, was busy or refused the request: the client bans it and fails over."""

    def __init__(self, hop: Hop, error: BaseException):
        super().__init__(f"{hop}: {error}")
        self.hop, self.error = hop, error

    def note(self, refusals: Refusals) -> None:
        """Keep this failure in ``refusals`` if it is one (raises there a second server's refusal)."""
        refusals.note(self.hop.peer_id, self.error, (self.hop.start, self.hop.end))


class TooManyFailures(RuntimeError):
    """Failover gave up after ``max_failovers`` attempts within one call."""


class ShardClient:
    """Tune ``request_timeout`` to the slowest request you expect (a dead server costs at most this
    per attempt), ``max_failovers`` to how many replicas one call may try, ``route_spread`` (see
    :class:`Router`) above 0 to spread load over replicas."""

    def __init__(
        self,
        dht: DHT,
        run_id: str,
        num_blocks: int,
        request_timeout: float = 30.0,
        max_failovers: int = 8,
        ban_seconds: float = 60.0,
        route_spread: float = 0.0,
    ):
        self.num_blocks, self.request_timeout, self.max_failovers = num_blocks, request_timeout, max_failovers
        self.p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        self.router = Router(dht, run_id, ban_seconds=ban_seconds, probe=self._probe, spread=route_spread)
        self.metrics = ShardClientMetrics()
        self.transport = Transport(self.p2p, ShardServicer, self.router.address_of)

    # -- transport ---------------------------------------------------------------------------------
    async def _call_async(self, peer_id: str, method: str, message):
        return await self.transport.call(peer_id, method, message, self.request_timeout)

    def _probe(self, peer_id: str, announcement: ShardAnnouncement) -> float:
        started = time.perf_counter()
        reply = RemoteExpertWorker.run_coroutine(
            self._call_async(peer_id, "info", runtime_pb2.ExpertUID(uid=announcement.run_id))
        )
        info = MSGPackSerializer.loads(reply.serialized_info)
        served = tuple(info.get(k) for k in ("run_id", "start", "end", "version"))
        claimed = (announcement.run_id, announcement.start, announcement.end, SHARD_PROTOCOL_VERSION)
        if served != claimed:
            # NOTE: anyone may announce another server's peer id: the claim is dropped, the server is not
            raise ForgedAnnouncement(f"server {peer_id} serves {served} but the announcement says {claimed}")
        return time.perf_counter() - started

    def call(
        self,
        hop: Hop,
        method: str,
        tensors: list[torch.Tensor],
        returns: list[torch.Tensor] | None = None,
        **metadata,
    ) -> list[torch.Tensor]:
        """One request to one server; :class:`ServerFailure` (after banning it) if it did not answer, refused
        the request, or answered with anything but tensors shaped like ``returns`` (default: the first one sent)."""
        started = time.perf_counter()
        self.metrics.requests += 1
        message = wire.request(tensors, start=hop.start, end=hop.end, **metadata)
        try:
            reply = RemoteExpertWorker.run_coroutine(self._call_async(hop.peer_id, method, message))
            result = wire.unpack_response(reply)
            _check_result(result, returns or tensors[:1])
        except Exception as e:  # noqa: BLE001 (reset, timed out, refused as malformed: all mean failover)
            self._failed(hop, started, e)
        self.router.observe_latency(hop.peer_id, time.perf_counter() - started)
        return result

    def _failed(self, hop: Hop, started: float, error: BaseException):
        self.metrics.failures += 1
        self.metrics.refused += is_refusal(error)
        self.metrics.bans += 1
        self.metrics.retry_seconds += time.perf_counter() - started
        self.router.ban(hop.peer_id)
        logger.warning(f"shard server {hop} failed: {error!r}; failing over")
        raise ServerFailure(hop, error) from error

    def _reroute(self, start: int, end: int, attempt: int, refusals: Refusals) -> list[Hop]:
        """A new route for blocks ``start:end`` after a failure; where none is left, a refusal of those blocks
        kept in ``refusals`` is raised as the caller's bug."""
        try:
            if attempt > self.max_failovers:
                raise TooManyFailures(f"blocks {start}:{end}: gave up after {self.max_failovers} failovers")
            started = time.perf_counter()
            route = self.router.route(start, end)
        except (TooManyFailures, NoRouteError) as e:
            refusals.none_left(e, (start, end))
            raise
        self.metrics.replays += 1
        self.metrics.route_changes += 1
        self.metrics.retry_seconds += time.perf_counter() - started
        return route

    # -- training ----------------------------------------------------------------------------------
    def forward(
        self,
        hidden: torch.Tensor,
        start: int = 0,
        end: int | None = None,
        how: Pass = PLAIN,
        refusals: Refusals | None = None,
    ) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor]]]:
        """Blocks ``start:end`` on ``hidden``; returns the output and the (hop, input) pairs to keep.
        ``refusals``: those of the pass this one is part of (a backward pass recomputing a span's inputs)."""
        end = self.num_blocks if end is None else end
        refusals = refusals or Refusals("forward pass", self.router.unban)
        kept: list[tuple[Hop, torch.Tensor]] = []
        route, block, attempt = self.router.route(start, end), start, 0
        while block < end:
            hop = route[0]
            extra, metadata = how.for_hop(hop)
            try:
                output = self.call(hop, "forward", [hidden, *extra], returns=[hidden], **metadata)[0]
            except ServerFailure as failure:
                failure.note(refusals)
                attempt += 1
                route = self._reroute(block, end, attempt, refusals)
                continue
            kept.append((hop, hidden))
            hidden, block, route = output, hop.end, route[1:]
        return hidden, kept

    def backward(
        self,
        kept: list[tuple[Hop, torch.Tensor]],
        grad_output: torch.Tensor,
        how: Pass = PLAIN,
        attempt: int = 0,
        refusals: Refusals | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gradients w.r.t. the first kept input and w.r.t. the pass's prefix (None without one), given
        the gradient w.r.t. the last hop's output."""
        refusals = refusals or Refusals("backward pass", self.router.unban)
        grad_prefix = (
            torch.zeros(how.prefix.shape, dtype=how.prefix.dtype) if how.prefix is not None else None
        )
        for hop, hidden in reversed(kept):
            extra, metadata = how.for_hop(hop)
            try:
                grads = self.call(
                    hop, "backward", [hidden, grad_output, *extra], returns=[hidden, *extra], **metadata
                )
                grad_output, hop_prefix = grads[0], (grads[1] if extra else None)
            except ServerFailure as failure:
                failure.note(refusals)
                route = self._reroute(hop.start, hop.end, attempt + 1, refusals)
                if len(route) == 1:
                    replica = [(route[0], hidden)]
                else:  # recompute the inputs of the span's inner hops on the replicas
                    replica = self.forward(hidden, hop.start, hop.end, how, refusals)[1]
                grad_output, replica_prefix = self.backward(replica, grad_output, how, attempt + 1, refusals)
                hop_prefix = replica_prefix[hop.start : hop.end] if replica_prefix is not None else None
            if grad_prefix is not None:
                grad_prefix[hop.start : hop.end] += hop_prefix
        return grad_output, grad_prefix

    def blocks(self, hidden: torch.Tensor, how: Pass = PLAIN) -> torch.Tensor:
        """All remote blocks as a differentiable function of ``hidden`` (and of ``how.prefix``)."""
        return _RemoteBlocks.apply(hidden, how.prefix, self, how)

    def inference_session(self, rows: int = 1, how: Pass = PLAIN) -> InferenceSession:
        """Generation through every block; ``how``: the first step's padding, and a prefix."""
        return InferenceSession(self, rows, how)

    def adapter_state(self, peer_id: str, start: int, end: int) -> tuple[list[torch.Tensor], int]:
        """A server's span adapter (tensors sorted by name) and how many steps it has taken."""
        message = wire.request([], start=start, end=end)
        reply = RemoteExpertWorker.run_coroutine(self._call_async(peer_id, "adapter_state", message))
        return wire.unpack_response(reply), int(wire.metadata_of(reply).get("steps", 0))

    def shutdown(self) -> None:
        """Close this client's connection to the p2p daemon (before the DHT that runs it)."""
        with contextlib.suppress(Exception):
            RemoteExpertWorker.run_coroutine(self.p2p.shutdown())


def _check_result(result: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Every shard method maps hidden states to hidden states (or their gradient) of the same shape, and
    backward a prefix to its gradient: anything else would surface later as a confusing error of the
    *next* server."""
    if [(t.shape, t.dtype) for t in result] != [(t.shape, t.dtype) for t in expected]:
        got = [(tuple(t.shape), t.dtype) for t in result]
        want = [(tuple(t.shape), t.dtype) for t in expected]
        raise wire.RemoteError(f"malformed response {got}, expected {want}", wire.INTERNAL)


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, prefix: torch.Tensor | None, client: ShardClient, how: Pass):
        output, kept = client.forward(hidden.detach(), how=how)
        ctx.client, ctx.kept, ctx.how = client, kept, how
        ctx.prefix_device = prefix.device if prefix is not None else None
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad, grad_prefix = ctx.client.backward(ctx.kept, grad_output.contiguous(), ctx.how)
        if grad_prefix is not None:
            grad_prefix = grad_prefix.to(ctx.prefix_device)
        return grad, grad_prefix, None, None


# -- inference ---------------------------------------------------------------------------------------
@dataclass
class _SessionHop:
    hop: Hop
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    history: list[torch.Tensor] = field(default_factory=list)
    """Every input this hop received, in order: what rebuilds its cache on a replica."""


class InferenceSession:
    """Token-by-token passes through all blocks with attention caches on the servers."""

    def __init__(self, client: ShardClient, rows: int, how: Pass = PLAIN):
        self.client, self.rows, self.how = client, rows, how
        self.start = self.position = how.position_offset
        """A prefix's tokens come first: the session's own start there."""
        self.hops: list[_SessionHop] = []

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[rows, new tokens, hidden_size]`` → the last block's output for them."""
        if not self.hops:
            self.hops = [_SessionHop(hop) for hop in self.client.router.route(0, self.client.num_blocks)]
        index, attempt = 0, 0
        refusals = Refusals(f"inference step at position {self.position}", self.client.router.unban)
        while index < len(self.hops):
            current = self.hops[index]
            try:
                output = self._send(current, hidden, self.position)
            except ServerFailure as failure:
                failure.note(refusals)
                while True:
                    attempt += 1
                    try:
                        self.hops[index : index + 1] = self._rebuild(current, attempt, refusals)
                        break
                    except ServerFailure as replica_failure:
                        replica_failure.note(refusals)
                continue
            current.history.append(hidden)
            hidden, index = output, index + 1
        self.position += hidden.shape[1]
        return hidden

    def _send(self, target: _SessionHop, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """One step to one server; its first step of the session carries the prefix."""
        how = dataclasses.replace(
            self.how, position_offset=position, prefix=None if target.history else self.how.prefix
        )
        extra, metadata = how.for_hop(target.hop)
        return self.client.call(
            target.hop, "inference", [hidden, *extra], returns=[hidden], session=target.session, **metadata
        )[0]

    def _rebuild(self, failed: _SessionHop, attempt: int, refusals: Refusals) -> list[_SessionHop]:
        """Replica hops for the failed hop's span, their caches filled with its whole history."""
        route = self.client._reroute(failed.hop.start, failed.hop.end, attempt, refusals)
        replicas = [_SessionHop(hop) for hop in route]
        if failed.history:
            hidden = torch.cat(failed.history, dim=1)
            for replica in replicas:
                output = self._send(replica, hidden, self.start)
                replica.history.append(hidden)
                hidden = output
        return replicas

    def close(self) -> None:
        for target in self.hops:
            with contextlib.suppress(Exception):
                RemoteExpertWorker.run_coroutine(
                    self.client._call_async(
                        target.hop.peer_id, "close_session", wire.request([], session=target.session)
                    )
                )
        self.hops = []

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
