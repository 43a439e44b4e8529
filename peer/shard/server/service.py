"""Serve a span of blocks over hivemind's p2p layer: forward, backward and cached inference.

Every request is validated before it reaches the model (tensor count and declared sizes before
decoding, then dtype, shape, finite values, the sub-span and positions it names); a bad one gets a
``bad_request`` error naming the field, and the server goes on serving others. A request or response
above hivemind's 4 MiB unary message travels in chunks on the method's ``_stream`` twin
(:mod:`..streaming`), which puts the same request together and runs the same handler; declared
sizes are checked on each tensor's first chunk, before the server buffers it. Memory is bounded by the
request limits (``max_stream_bytes`` per stream, ``max_streams`` at once, each arriving within
``stream_timeout``), the compute queue (:mod:`batching`) and the attention-cache budget of inference
sessions, prefixes included (tests/test_shards.py floods a server to check it).

Backward is stateless, as in Petals: the client sends the span's inputs with the output gradient and
the server recomputes the forward pass with autograd, so a replica that never saw the forward pass can
serve the backward pass just as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import AsyncIterator  # noqa: UP035 (hivemind finds streaming RPCs by typing's name)

import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.cache_utils import DynamicCache

from potluck.peer.quantization import base_parameter
from potluck.peer.shard import wire
from potluck.peer.shard.blocks import BlockSpan
from potluck.peer.shard.metrics import ShardServerMetrics
from potluck.peer.shard.server.adapters import SpanAdapter
from potluck.peer.shard.server.batching import BatchingExecutor, ServerBusy
from potluck.peer.shard.server.handling import BadRequest, ForwardBackward, RequestHandling, decode_tensors
from potluck.protocols.shards import MAX_PREFIX_TOKENS, SHARD_PROTOCOL_VERSION

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """What one request or session may ask of this server; raise them on a big GPU, lower them when
    the server runs out of memory."""

    max_rows: int = 256
    """Sequences per request."""
    max_request_tokens: int = 16384
    """Rows × tokens per request."""
    max_stream_bytes: int | None = None
    """Tensor bytes of one request streamed in chunks (above hivemind's 4 MiB unary message), buffered
    before it is computed. None: what a backward request of ``max_request_tokens`` carries (two tensors of
    rows × tokens × hidden size, and a prefix of ``max_prefix_tokens``) in the server's dtype."""
    max_streams: int = 4
    """Streamed requests being received or computed at once; more are refused as ``busy``. With
    ``max_stream_bytes`` it bounds the memory streams hold."""
    stream_timeout: float = 300.0
    """Seconds a streamed request may take to arrive; a stalled one is refused and its memory freed."""
    max_batch_tokens: int = 16384
    """Rows × tokens of one computed batch after merging concurrent requests."""
    max_queue: int = 64
    """Requests waiting for the compute thread; more are refused as ``busy``."""
    max_sessions: int = 64
    max_cache_tokens: int = 65536
    """Rows × tokens over all open inference sessions (the attention caches' memory), prefixes included."""
    max_prefix_tokens: int = MAX_PREFIX_TOKENS
    """Tokens of a client's prefix (prefix tuning) per request."""
    session_ttl: float = 300.0
    """An inference session idle this long is closed and its cache freed."""


@dataclass
class _Session:
    cache: DynamicCache
    meta: dict
    """The first step's parsed metadata: blocks, padding, prefix and adapter hold for every step."""
    rows: int
    tokens: int = 0
    pending: int = 0
    """Tokens of the step now computing: reserved in the cache budget, and > 0 refuses a concurrent
    step of the same session (it would run against a cache of the wrong length)."""
    last_used: float = field(default_factory=time.monotonic)


class ShardServicer(ForwardBackward):
    """The RPC handlers of a block-span server (registered on a replica of the DHT's p2p daemon)."""

    def __init__(
        self,
        span: BlockSpan,
        run_id: str,
        limits: ServerLimits,
        metrics: ShardServerMetrics | None = None,
        adapter: SpanAdapter | None = None,
    ):
        self.span, self.run_id, self.limits, self.adapter = span, run_id, limits, adapter
        # the adapter's lock, held for every pass: averaging rewrites the adapter between passes
        self._guard = adapter.lock if adapter is not None else contextlib.nullcontext()
        self.dtype = base_parameter(span).dtype  # a quantised span's first weights are integers
        self.device = base_parameter(span).device
        self.metrics = metrics or ShardServerMetrics(run_id, span.start, span.end)
        self.executor = BatchingExecutor(limits.max_batch_tokens, limits.max_queue)
        self.executor.on_batch = self.metrics.observe_batch
        self.sessions: dict[tuple[str, str], _Session] = {}
        self._streams = 0
        """Streamed requests now being received or computed (the event loop's thread alone counts them)."""

    # -- handlers ----------------------------------------------------------------------------------
    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        self.metrics.requests.labels(self.run_id, "info").inc()
        info = {
            "run_id": self.run_id,
            "start": self.span.start,
            "end": self.span.end,
            "hidden_size": self.span.hidden_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "version": SHARD_PROTOCOL_VERSION,
        }
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(info))

    async def rpc_inference(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        return await self._handle(
            "inference", request, lambda r: self._inference(r, str(context.remote_id)), context
        )

    # the streaming twin, for requests above hivemind's unary message size (forward's and backward's: ForwardBackward)
    def rpc_inference_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return self._streamed(
            "inference", requests, lambda r: self._inference(r, str(context.remote_id)), context
        )

    async def rpc_close_session(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        try:
            meta = wire.metadata_of(request)
        except wire.RemoteError as e:
            return self._refuse("close_session", str(e))
        self._drop_session((str(context.remote_id), str(meta.get("session"))))
        return wire.response([])

    async def rpc_adapter_state(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """The served adapter's tensors (sorted by name) and its step count: for checks and tests."""
        if self.adapter is None:
            return self._refuse("adapter_state", "this server holds no adapter")
        return wire.response(self.adapter.tensors(), steps=self.adapter.steps)

    # -- computations ------------------------------------------------------------------------------
    def _through(
        self, hidden: torch.Tensor, meta: dict, padding: torch.Tensor, prefix, cache=None
    ) -> torch.Tensor:
        """The request's blocks on ``hidden`` (on this server's device), after the client's prefix if it sent
        one, with the served adapter unless the request turned it off."""
        if prefix is not None and cache is None:
            cache = self.span.prefilled_cache(prefix.to(self.device), meta["blocks"], hidden.shape[0])
        adapter_off = self.adapter is not None and not meta["adapter"]
        with without_adapters(self.span) if adapter_off else contextlib.nullcontext():
            return self.span(
                hidden,
                meta["position_offset"],
                cache=cache,
                blocks=meta["blocks"],
                padding=_any(padding),
                prefix_tokens=meta["prefix_tokens"],
            )

    def _key(self, kind: str, meta: dict, hidden: torch.Tensor):
        """Requests that may run as one batch: same pass, blocks, positions and adapter, and no prefix of
        their own (each client's prefix is its own)."""
        if meta["prefix_tokens"]:
            return None
        if kind == "backward" and self.adapter is not None and meta["adapter"]:
            return None  # each request is one of the adapter's backward requests (accumulate_backwards)
        return (kind, meta["blocks"], meta["position_offset"], hidden.shape[1], meta["adapter"])

    async def _forward(self, request) -> list[torch.Tensor]:
        meta, tensors = self._parse(request, ["hidden"])

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            hidden, padding, *prefix = inputs
            with self._guard, torch.inference_mode():
                return [self._through(hidden.to(self.device), meta, padding, _first(prefix)).cpu()]

        inputs = [tensors[0], meta["padding"], *tensors[1:]]
        return await self.executor.submit(inputs, run, key=self._key("forward", meta, tensors[0]))

    async def _backward(self, request) -> list[torch.Tensor]:
        meta, (hidden, grad_output, *prefix) = self._parse(request, ["hidden", "grad_output"])
        if grad_output.shape != hidden.shape:
            raise BadRequest(f"grad_output: shape {tuple(grad_output.shape)} differs from hidden's")

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            hidden, grad_output, padding, *prefix = inputs
            with self._guard, torch.enable_grad():
                leaves = [hidden.to(self.device).requires_grad_(True)]
                leaves += [p.to(self.device).requires_grad_(True) for p in prefix]
                output = self._through(leaves[0], meta, padding, _first(leaves[1:]))
                grad_output = grad_output.to(self.device)
                if self.adapter is None or not meta["adapter"]:
                    return [g.cpu() for g in torch.autograd.grad(output, leaves, grad_output)]
                # a served adapter learns from every backward pass that goes through it
                output.backward(grad_output)
                self.adapter.after_backward()
                return [leaf.grad.cpu() for leaf in leaves]

        inputs = [hidden, grad_output, meta["padding"], *prefix]
        return await self.executor.submit(inputs, run, key=self._key("backward", meta, hidden))

    async def _inference(self, request, client: str) -> list[torch.Tensor]:
        meta, (hidden, *prefix) = self._parse(request, ["hidden"])
        session_id = meta.get("session")
        if not isinstance(session_id, str) or not 0 < len(session_id) <= 64:
            raise BadRequest("session: expected a string id of 1 to 64 characters")
        self._evict_idle()
        key = (client, session_id)
        session = self.sessions.get(key)
        rows, tokens, offset = hidden.shape[0], hidden.shape[1], meta["position_offset"]
        if session is None:
            if offset != meta["prefix_tokens"]:
                raise BadRequest(
                    f"position_offset: a new session starts at {meta['prefix_tokens']}, not {offset}"
                )
            if len(self.sessions) >= self.limits.max_sessions:
                raise ServerBusy(f"too many inference sessions ({self.limits.max_sessions})")
            cache = DynamicCache()
            if prefix:  # the session's cache starts with the client's prefix, as after a prefill of it
                cache = self.span.prefilled_cache(prefix[0].to(self.device), meta["blocks"], rows)
            session = _Session(cache, meta, rows, offset)
        elif prefix:
            raise BadRequest("prefix: only a session's first step may send one")
        elif (rows, meta["blocks"]) != (session.rows, session.meta["blocks"]):
            raise BadRequest(f"hidden: rows {rows} and blocks {meta['blocks']} differ from the session's")
        elif not torch.equal(meta["padding"], session.meta["padding"]):
            raise BadRequest("padding: differs from the session's first step")
        elif session.pending:
            raise BadRequest("session: its previous step is still running (send steps one at a time)")
        elif offset != session.tokens:  # history and positions out of sync (Petals issue #587)
            raise BadRequest(
                f"position_offset: {offset} does not match the session's {session.tokens} tokens"
            )
        new = rows * (tokens + (offset if key not in self.sessions else 0))  # a new session's prefix too
        if self._cached_tokens() + new > self.limits.max_cache_tokens:
            raise ServerBusy(f"the attention-cache budget ({self.limits.max_cache_tokens} tokens) is full")
        session.pending = tokens
        self.sessions[key] = session
        step = {**session.meta, "position_offset": offset}

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            with self._guard, torch.inference_mode():
                output = self._through(inputs[0].to(self.device), step, step["padding"], None, session.cache)
                return [output.cpu()]

        try:
            (output,) = await self.executor.submit([hidden], run)
        except Exception:
            self._drop_session(key)  # a cache half-updated by a failed step is useless
            raise
        session.tokens, session.pending = session.tokens + tokens, 0
        session.last_used = time.monotonic()
        self.metrics.sessions.labels(self.run_id).set(len(self.sessions))
        return [output]

    # -- validation and sessions -------------------------------------------------------------------
    def _parse(self, request, names: list[str]) -> tuple[dict, list[torch.Tensor]]:
        """The request's metadata (checked and with defaults) and its tensors: ``names``, then the
        ``prefix`` when ``prefix_tokens`` says it sent one."""
        meta = wire.metadata_of(request)
        start, end = meta.get("start"), meta.get("end")
        if not (isinstance(start, int) and isinstance(end, int)):
            raise BadRequest("start/end: expected integers")
        if not self.span.start <= start < end <= self.span.end:
            raise BadRequest(f"start/end: {start}:{end} is not within this server's blocks "
                              f"{self.span.start}:{self.span.end}")  # fmt: skip
        offset = meta.get("position_offset", 0)
        if not isinstance(offset, int) or offset < 0:
            raise BadRequest("position_offset: expected a non-negative integer")
        prefix_tokens = meta.get("prefix_tokens", 0)
        if not isinstance(prefix_tokens, int) or not 0 <= prefix_tokens <= self.limits.max_prefix_tokens:
            raise BadRequest(f"prefix_tokens: expected an integer from 0 to {self.limits.max_prefix_tokens}")
        if prefix_tokens and offset != prefix_tokens:
            raise BadRequest(
                f"position_offset: {offset}, but the tokens after a prefix of {prefix_tokens} start there"
            )
        adapter = meta.get("adapter", True)
        if not isinstance(adapter, bool):
            raise BadRequest("adapter: expected true or false")
        tensors = decode_tensors(request, [*names, "prefix"] if prefix_tokens else names, self._max_elements)
        for name, tensor in zip(names, tensors, strict=False):
            self._check(name, tensor, offset)
        if prefix_tokens:
            self._check_prefix(tensors[-1], (start, end), prefix_tokens)
        padding = _parse_padding(
            meta.get("padding"), tensors[0].shape[0], self.span.config.max_position_embeddings
        )
        parsed = {"blocks": (start, end), "position_offset": offset, "session": meta.get("session")}
        return {**parsed, "padding": padding, "prefix_tokens": prefix_tokens, "adapter": adapter}, tensors

    def _check_prefix(self, prefix: torch.Tensor, blocks: tuple[int, int], tokens: int) -> None:
        attention = self.span.layers[0].self_attn
        heads = self.span.config.num_key_value_heads
        expected = (blocks[1] - blocks[0], 2, heads, tokens, attention.head_dim)
        if prefix.dtype != self.dtype:
            raise BadRequest(f"prefix: dtype {prefix.dtype} but this server runs {self.dtype}")
        if tuple(prefix.shape) != expected:
            raise BadRequest(
                f"prefix: shape {tuple(prefix.shape)}, expected {expected} (blocks, key and value, heads, tokens, head size)"
            )
        if not torch.isfinite(prefix).all():
            raise BadRequest("prefix: contains NaN or Inf")

    @property
    def _max_elements(self) -> int:
        """The most elements a request's tensor may declare."""
        return self.limits.max_request_tokens * self.span.hidden_size

    @property
    def _stream_bytes(self) -> int:
        """The most tensor bytes one streamed request may carry (:attr:`ServerLimits.max_stream_bytes`)."""
        if self.limits.max_stream_bytes is not None:
            return self.limits.max_stream_bytes
        attention = self.span.layers[0].self_attn
        prefix = self.span.end - self.span.start, 2, self.span.config.num_key_value_heads, attention.head_dim
        elements = 2 * self._max_elements + math.prod(prefix) * self.limits.max_prefix_tokens
        return elements * torch.finfo(self.dtype).bits // 8

    def _check(self, name: str, tensor: torch.Tensor, offset: int) -> None:
        if tensor.dtype != self.dtype:
            raise BadRequest(f"{name}: dtype {tensor.dtype} but this server runs {self.dtype}")
        if tensor.dim() != 3 or tensor.shape[-1] != self.span.hidden_size or 0 in tensor.shape:
            raise BadRequest(
                f"{name}: shape {tuple(tensor.shape)}, expected (rows, tokens, {self.span.hidden_size})"
            )
        rows, tokens = tensor.shape[0], tensor.shape[1]
        if rows > self.limits.max_rows or rows * tokens > self.limits.max_request_tokens:
            raise BadRequest(
                f"{name}: {rows} rows × {tokens} tokens exceeds this server's limits "
                f"({self.limits.max_rows} rows, {self.limits.max_request_tokens} rows × tokens)"
            )
        max_positions = self.span.config.max_position_embeddings
        if offset + tokens > max_positions:
            raise BadRequest(
                f"position_offset: {offset} + {tokens} tokens exceeds the model's {max_positions}"
            )
        if not torch.isfinite(tensor).all():
            raise BadRequest(f"{name}: contains NaN or Inf")

    def _cached_tokens(self) -> int:
        return sum(s.rows * (s.tokens + s.pending) for s in self.sessions.values())

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self.sessions.items() if now - s.last_used > self.limits.session_ttl]:
            self._drop_session(key)

    def _drop_session(self, key) -> None:
        self.sessions.pop(key, None)
        self.metrics.sessions.labels(self.run_id).set(len(self.sessions))

    def shutdown(self) -> None:
        self.executor.shutdown()
        self.sessions.clear()


def _parse_padding(value, rows: int, max_positions: int) -> torch.Tensor:
    """The request's ``padding`` (each row's count of left pads; absent: none) as an int64 tensor."""
    if value is None:
        return torch.zeros(rows, dtype=torch.int64)
    if not isinstance(value, list) or len(value) != rows:
        raise BadRequest(f"padding: expected a list of {rows} integers, one per row")
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= max_positions for p in value):
        raise BadRequest(f"padding: expected integers from 0 to {max_positions}")
    return torch.tensor(value, dtype=torch.int64)


def _any(padding: torch.Tensor) -> torch.Tensor | None:
    """None for a batch without pads: its mask and positions stay shared by every row."""
    return padding if bool(padding.any()) else None


def _first(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    return tensors[0] if tensors else None


@contextlib.contextmanager
def without_adapters(span: BlockSpan):
    """The span's base weights alone for one pass (a client's reference model), its adapters untouched."""
    layers = [m for m in span.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def measure_throughput(span: BlockSpan, tokens: int = 128, repeats: int = 3) -> float:
    """Tokens per second through one block (forward), as announced to clients for routing."""
    weight = base_parameter(span)
    hidden = torch.randn(1, min(tokens, span.config.max_position_embeddings), span.hidden_size)
    hidden = hidden.to(weight.device, weight.dtype)
    with torch.inference_mode():
        span(hidden)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            span(hidden)
        if weight.is_cuda:
            torch.cuda.synchronize(weight.device)
    seconds = max(time.perf_counter() - started, 1e-9)
    return hidden.shape[1] * repeats * (span.end - span.start) / seconds


async def serve_on(p2p, servicer: RequestHandling) -> None:
    await servicer.add_p2p_handlers(p2p)


async def stop_serving(p2p, servicer: RequestHandling) -> None:
    await asyncio.wait_for(servicer.remove_p2p_handlers(p2p), timeout=5)


def stop_server(announcer, p2p, servicer: RequestHandling | None) -> None:
    """A span or expert server's leaving: announced offline, its handlers off the p2p daemon, its compute
    thread stopped. Each may be None (the role stopped before it made it)."""
    if announcer is not None:
        announcer.stop()
    if servicer is None:
        return
    if p2p is not None:
        with contextlib.suppress(Exception):  # leaving anyway; the daemon goes with the DHT
            RemoteExpertWorker.run_coroutine(stop_serving(p2p, servicer))
    servicer.shutdown()
