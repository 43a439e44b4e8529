"""Serve experts of a mixture-of-experts model over hivemind's p2p layer: forward, and backward that trains them.

A request names one expert by its uid (metadata ``uid``: ``<layer>.<expert>``, ``protocols/experts.py``) and
carries the tokens routed to it, ``hidden`` ``[tokens, hidden size]`` (backward: and ``grad_output`` of the same
shape). Requests are validated as a span server's are (``handling.py``: count and declared sizes before decoding,
then dtype, shape, sizes, finite values; each error names the field), and run on one compute thread
(``batching.py``): concurrent forward requests for the same expert run as one batch.

Backward is stateless, as a span server's: the server recomputes the expert's forward pass on the tokens sent,
returns the gradient of its input, and applies the gradient of its weights with the run's optimizer
(``steps.ServerSteps``: AdamW, ``optimizer.lr`` and schedule). NOTE: one optimizer step per backward request,
per expert, as asynchronous SGD: a trainer's batch that routes tokens to an expert steps it once; several
trainers step it in turn. Replicas of an expert are not averaged yet (docs/architecture.md, "Not built yet").
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import AsyncIterator  # noqa: UP035 (hivemind finds streaming RPCs by typing's name)

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from potluck.peer.shard import wire
from potluck.peer.shard.experts import ExpertFFN
from potluck.peer.shard.metrics import ExpertServerMetrics
from potluck.peer.shard.server.announce import Announcer
from potluck.peer.shard.server.batching import BatchingExecutor, LoadMeter
from potluck.peer.shard.server.handling import BadRequest, ForwardBackward, decode_tensors, failure_kind
from potluck.peer.shard.server.service import ServerLimits
from potluck.peer.shard.server.steps import ServerSteps
from potluck.protocols.experts import (
    EXPERT_PROTOCOL_VERSION,
    ExpertAnnouncement,
    announce_experts,
    expert_uid,
    parse_uid,
)
from potluck.protocols.runspec import RunSpec

Uid = tuple[int, int]


class ServedExperts:
    """The experts a server holds, each with its own optimizer (``steps[uid]``; its ``lock`` guards the expert)."""

    def __init__(self, experts: dict[Uid, ExpertFFN], spec: RunSpec):
        self.experts = experts
        for expert in experts.values():
            expert.requires_grad_(True)
        self.steps = {
            uid: ServerSteps(list(expert.parameters()), spec, 1, f"expert {expert_uid(*uid)}")
            for uid, expert in experts.items()
        }
        self.on_step = lambda: None
        """Called after any expert's optimizer step, on the compute thread, no lock held (the periodic checkpoint)."""

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.steps.values())

    def forward(self, uid: Uid, hidden: torch.Tensor) -> torch.Tensor:
        with self.steps[uid].lock, torch.inference_mode():
            return self.experts[uid](hidden)

    def backward(self, uid: Uid, hidden: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        """The gradient of the expert's input; the expert takes an optimizer step on its own."""
        steps = self.steps[uid]
        with steps.lock, torch.enable_grad():
            hidden = hidden.detach().requires_grad_(True)
            self.experts[uid](hidden).backward(grad_output)
            stepped = steps.after_backward()
        if stepped:
            self.on_step()
        return hidden.grad

    def idle_step(self, uid: Uid) -> None:
        """The step of an expert that a trainer's backward pass sent no token (``ServerSteps.idle_step``)."""
        with self.steps[uid].lock:
            stepped = self.steps[uid].idle_step()
        if stepped:
            self.on_step()

    def state(self, uid: Uid) -> tuple[list[torch.Tensor], int]:
        """A copy of the expert's state (weights gate, up, down, then their AdamW ``exp_avg`` and ``exp_avg_sq``:
        ``ServerSteps.state_tensors``) and its step count."""
        with self.steps[uid].lock:
            return self.steps[uid].snapshot()

    def state_bytes(self, uid: Uid) -> int:
        return sum(t.numel() * t.element_size() for t in self.steps[uid].state_tensors())


class ExpertServicer(ForwardBackward):
    """The RPC handlers of an expert server (registered on a replica of the DHT's p2p daemon). ``round_state(uid,
    round)``: the expert's state as snapshot for an averaging round of its replicas (``expert_replicas.py``)."""

    def __init__(
        self,
        experts: ServedExperts,
        run_id: str,
        hidden_size: int,
        limits: ServerLimits,
        metrics: ExpertServerMetrics | None = None,
        round_state: Callable[[Uid, int], tuple[list[torch.Tensor], int, int]] | None = None,
    ):
        self.served, self.run_id, self.hidden_size, self.limits = experts, run_id, hidden_size, limits
        first = next(iter(experts.experts.values())).down.weight
        self.dtype, self.device = first.dtype, first.device
        self.metrics = metrics or ExpertServerMetrics(run_id)
        self.round_state = round_state
        self.executor = BatchingExecutor(limits.max_batch_tokens, limits.max_queue)
        self.executor.on_batch = self.metrics.observe_batch
        self._load_meter = LoadMeter(self.executor)
        self.metrics.serving([expert_uid(*uid) for uid in experts.experts])
        self._streams = 0

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        self.metrics.requests.labels(self.run_id, "info").inc()
        info = {
            "run_id": self.run_id,
            "uids": sorted(expert_uid(*uid) for uid in self.served.experts),
            "hidden_size": self.hidden_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "version": EXPERT_PROTOCOL_VERSION,
            "steps": {expert_uid(*uid): steps.steps for uid, steps in self.served.steps.items()},
        }
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(info))

    async def rpc_idle_steps(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """A step on a zero gradient for each expert in metadata ``uids``: those of a MoE layer that a trainer's
        backward pass routed no token to (local training's optimizer steps them too, on momentum alone)."""
        return await self._handle("idle_steps", request, self._idle_steps, context)

    async def _idle_steps(self, request) -> list[torch.Tensor]:
        uids = wire.metadata_of(request).get("uids")
        if not isinstance(uids, list) or not 0 < len(uids) <= len(self.served.experts):
            raise BadRequest(f"uids: {uids!r} is not a list of at most {len(self.served.experts)} experts")
        parsed = [self._uid({"uid": uid}) for uid in uids]
        if len(set(parsed)) != len(parsed):
            raise BadRequest("uids: an expert is listed twice")

        def run(_: list[torch.Tensor]) -> list[torch.Tensor]:
            for uid in parsed:
                self.served.idle_step(uid)
            return []

        return await self.executor.submit([], run)

    async def rpc_expert_state(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """An expert's state (``ServedExperts.state``) and its optimizer steps, as a last tensor: now, or as
        snapshot for averaging round ``round`` (metadata; ``busy`` until this server took that snapshot), then
        followed by its weight in the round (steps since this replica's last round)."""
        return await self._handle("expert_state", request, self._state, context)

    def rpc_expert_state_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """:meth:`rpc_expert_state` for a state above the unary cap: the response comes back in chunks."""
        return self._streamed("expert_state", requests, self._state, context)

    async def _state(self, request) -> list[torch.Tensor]:
        meta = wire.metadata_of(request)
        uid, round_ = self._uid(meta), meta.get("round")
        if round_ is None:
            tensors, steps = self.served.state(uid)
        elif type(round_) is not int or self.round_state is None:
            raise BadRequest(f"round: {round_!r} is not an averaging round of this server")
        else:
            tensors, steps, weight = self.round_state(uid, round_)
            return [*tensors, torch.tensor(steps), torch.tensor(weight)]
        return [*tensors, torch.tensor(steps)]

    # -- computations ------------------------------------------------------------------------------
    async def _forward(self, request) -> list[torch.Tensor]:
        uid = self._uid(wire.metadata_of(request))
        return await self._per_expert(uid, "forward", self._forward_on(uid, request))

    async def _forward_on(self, uid: Uid, request) -> list[torch.Tensor]:
        (hidden,) = self._tensors(request, ["hidden"])
        self.metrics.tokens.labels(self.run_id, expert_uid(*uid)).inc(hidden.shape[0])

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            return [self.served.forward(uid, inputs[0].to(self.device)).cpu()]

        return await self.executor.submit([hidden], run, key=("forward", uid))

    async def _backward(self, request) -> list[torch.Tensor]:
        uid = self._uid(wire.metadata_of(request))
        return await self._per_expert(uid, "backward", self._backward_on(uid, request))

    async def _backward_on(self, uid: Uid, request) -> list[torch.Tensor]:
        hidden, grad_output = self._tensors(request, ["hidden", "grad_output"])
        if grad_output.shape != hidden.shape:
            raise BadRequest(f"grad_output: shape {tuple(grad_output.shape)} differs from hidden's")

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            hidden, grad_output = (t.to(self.device) for t in inputs)
            return [self.served.backward(uid, hidden, grad_output).cpu()]

        # each backward request is one optimizer step of its expert: never merged with another's
        return await self.executor.submit([hidden, grad_output], run)

    async def _per_expert(
        self, uid: Uid, method: str, answer: Awaitable[list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """``answer``, timed and its failure counted under the expert (``potluck_expert_request_*``)."""
        label, started, kind = expert_uid(*uid), time.perf_counter(), None
        try:
            return await answer
        except Exception as e:  # as ``handling.RequestHandling._handle`` answers it
            kind = failure_kind(e)
            raise
        finally:
            self.metrics.expert_seconds.labels(self.run_id, label, method).observe(
                time.perf_counter() - started
            )
            if kind is not None:
                self.metrics.expert_failures.labels(self.run_id, label, kind).inc()

    def load(self) -> float:
        """The compute thread's busy share since the last call (announced; also the ``load`` gauge)."""
        value = self._load_meter.read()
        self.metrics.load.labels(self.run_id).set(value)
        return value

    # -- validation --------------------------------------------------------------------------------
    def _uid(self, meta: dict) -> Uid:
        uid = meta.get("uid")
        try:
            parsed = parse_uid(uid) if isinstance(uid, str) else None
        except ValueError:
            parsed = None
        if parsed not in self.served.experts:
            served = ", ".join(sorted(expert_uid(*u) for u in self.served.experts))
            raise BadRequest(f"uid: {uid!r} is not an expert this server holds ({served})")
        return parsed

    def _tensors(self, request, names: list[str]) -> list[torch.Tensor]:
        tensors = decode_tensors(request, names, self._max_elements)
        for name, tensor in zip(names, tensors, strict=True):
            if tensor.dtype != self.dtype:
                raise BadRequest(f"{name}: dtype {tensor.dtype} but this server runs {self.dtype}")
            if tensor.dim() != 2 or tensor.shape[1] != self.hidden_size or tensor.shape[0] == 0:
                raise BadRequest(
                    f"{name}: shape {tuple(tensor.shape)}, expected (tokens, {self.hidden_size})"
                )
            if not torch.isfinite(tensor).all():
                raise BadRequest(f"{name}: contains NaN or Inf")
        return tensors

    @property
    def _max_elements(self) -> int:
        return self.limits.max_request_tokens * self.hidden_size

    @property
    def _stream_bytes(self) -> int:
        if self.limits.max_stream_bytes is not None:
            return self.limits.max_stream_bytes
        return 2 * self._max_elements * torch.finfo(self.dtype).bits // 8  # a backward request's two tensors

    def shutdown(self) -> None:
        self.executor.shutdown()


class ExpertAnnouncer(Announcer):
    """An expert server's :class:`ExpertAnnouncement`. ``load``: its compute thread's busy share since the last
    announcement (``batching.LoadMeter.read``; also set on the ``potluck_expert_server_load`` gauge)."""

    def __init__(
        self,
        dht,
        key_tag: bytes,
        run_id: str,
        uids: list[Uid],
        throughput: float,
        interval: float = 5.0,
        load: Callable[[], float] = lambda: 0.0,
    ):
        super().__init__(dht, key_tag, run_id, interval)
        self.uids, self.throughput, self.load = [expert_uid(*uid) for uid in uids], throughput, load

    def announcement(self, state: str) -> ExpertAnnouncement:
        return ExpertAnnouncement(
            run_id=self.run_id,
            peer_id=str(self.dht.peer_id),
            uids=self.uids,
            throughput=float(self.throughput),
            load=float(self.load()) if state == "online" else 0.0,
            state=state,
            version=EXPERT_PROTOCOL_VERSION,
            announced_at=time.time(),
            addresses=self.addresses,
        )

    def store(self, record: ExpertAnnouncement, ttl: float) -> bool:
        return announce_experts(self.dht, self.key_tag, record, ttl=ttl)


def measure_expert_throughput(
    expert: ExpertFFN, hidden_size: int, tokens: int = 256, repeats: int = 3
) -> float:
    """Tokens per second through one expert (forward), as announced to trainers."""
    weight = expert.down.weight
    hidden = torch.randn(tokens, hidden_size, dtype=weight.dtype, device=weight.device)
    with torch.inference_mode():
        expert(hidden)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            expert(hidden)
        if weight.is_cuda:
            torch.cuda.synchronize(weight.device)
    return tokens * repeats / max(time.perf_counter() - started, 1e-9)
