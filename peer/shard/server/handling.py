"""What every shard servicer does around its computations (block spans: ``service.py``; experts:
``expert_service.py``): count and time each request, turn errors into the wire's kinds (``bad_request`` names
the field, ``busy`` and ``internal`` make the client fail over), put streamed requests together within their
bounds (:mod:`..streaming`), and decode a request's tensors only after checking their count and declared sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import AsyncIterator  # noqa: UP035 (hivemind finds streaming RPCs by typing's name)

import torch
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from potluck.hivemind_ext.access import access_in_use
from potluck.peer.shard import streaming, wire
from potluck.peer.shard.server.batching import ServerBusy

logger = logging.getLogger(__name__)


class BadRequest(ValueError):
    """The request is malformed; the message names the field."""


class Forbidden(PermissionError):
    """The caller holds no valid access token for this server's private run."""


async def admits_caller(context: P2PContext) -> bool:
    """Whether a private run admits the caller (always, in a public run); a refusal is counted and logged once."""
    access = access_in_use()
    if access is None or await access.admits_async(context.remote_id):
        return True
    access.refuse("shard", context.remote_id)
    return False


def failure_kind(error: Exception) -> str:
    """The wire's kind of a handler's error: the caller's (``bad_request``; ``forbidden`` without a private run's
    token), a full queue (``busy``), or the server's own (``internal``)."""
    if isinstance(error, Forbidden):
        return wire.FORBIDDEN
    if isinstance(error, (BadRequest, wire.RemoteError)):
        return wire.BAD_REQUEST
    if isinstance(error, ServerBusy):
        return wire.BUSY
    return wire.INTERNAL


class RequestHandling(ServicerBase):
    """A servicer's request plumbing. Subclasses set ``run_id``, ``limits`` (``service.ServerLimits``), ``metrics``
    (``metrics.ShardServerMetrics``) and ``_streams = 0``, and define :attr:`_max_elements` and
    :attr:`_stream_bytes`; they declare no RPC here (hivemind names handlers by the subclass)."""

    @property
    def _max_elements(self) -> int:
        """The most elements a request's tensor may declare."""
        raise NotImplementedError

    @property
    def _stream_bytes(self) -> int:
        """The most tensor bytes one streamed request may carry."""
        raise NotImplementedError

    async def _handle(
        self, method: str, request, handler, context: P2PContext | None = None
    ) -> runtime_pb2.ExpertResponse:
        started = time.perf_counter()
        self.metrics.requests.labels(self.run_id, method).inc()
        try:
            if context is not None and not await admits_caller(context):
                raise Forbidden(f"private run {self.run_id!r}: this peer holds no valid access token")
            return wire.response(await handler(request))
        except Exception as e:  # noqa: BLE001 (reported to the client: its kind says whose fault it was)
            kind, message = failure_kind(e), str(e)
            if kind == wire.INTERNAL:
                logger.exception(f"{method} failed")
                message = f"{type(e).__name__}: {e}"
        finally:
            self.metrics.latency.labels(self.run_id, method).observe(time.perf_counter() - started)
        self.metrics.failures.labels(self.run_id, method, kind).inc()
        return wire.error_response(f"{method}: {message}", kind)

    def _refuse(self, method: str, message: str) -> runtime_pb2.ExpertResponse:
        """A ``bad_request`` answer of a handler that does not go through :meth:`_handle`, counted as its are (the
        fuzzing in tests/test_shard_fuzz.py found refused ``close_session`` calls missing from the counters)."""
        self.metrics.failures.labels(self.run_id, method, wire.BAD_REQUEST).inc()
        return wire.error_response(f"{method}: {message}", wire.BAD_REQUEST)

    async def _streamed(
        self, method: str, requests: AsyncIterator, handler, context: P2PContext | None = None
    ) -> AsyncIterator:
        """The chunks put together into one request (bounded as they arrive), the same handler, and
        the response sent back in chunks."""

        async def combined(stream: AsyncIterator) -> list[torch.Tensor]:
            if self._streams >= self.limits.max_streams:
                raise ServerBusy(f"too many streamed requests at once ({self.limits.max_streams})")
            self._streams += 1
            try:
                arriving = streaming.combine(stream, self._stream_bytes, wire.BAD_REQUEST, self._max_elements)
                try:
                    request = await asyncio.wait_for(arriving, self.limits.stream_timeout)
                except asyncio.TimeoutError:
                    raise BadRequest(
                        f"stream: not all of it arrived within {self.limits.stream_timeout:g} s"
                    ) from None
                return await handler(request)
            finally:
                self._streams -= 1

        for part in streaming.answer(await self._handle(method, requests, combined, context)):
            yield part
        # a refused stream may still be arriving: discard the rest (hivemind's reader waits on us), for a while
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_drain(requests), self.limits.stream_timeout)
        # then the caller hangs up (hivemind cancels this): closing first could lose the answer's end (streaming.py)
        await asyncio.sleep(streaming.HANG_UP_WITHIN)


class ForwardBackward(RequestHandling):
    """The ``forward`` and ``backward`` RPCs and their streaming twins, handled by the subclass's ``_forward`` and
    ``_backward`` (request → result tensors). hivemind names the handlers by the concrete class, so a span
    server's and an expert server's do not clash."""

    async def _forward(self, request) -> list[torch.Tensor]:
        raise NotImplementedError

    async def _backward(self, request) -> list[torch.Tensor]:
        raise NotImplementedError

    async def rpc_forward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        return await self._handle("forward", request, self._forward, context)

    async def rpc_backward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        return await self._handle("backward", request, self._backward, context)

    def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return self._streamed("forward", requests, self._forward, context)

    def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return self._streamed("backward", requests, self._backward, context)


def decode_tensors(request, names: list[str], max_elements: int) -> list[torch.Tensor]:
    """The request's tensors, one per name in ``names``: their count and declared shapes checked before decoding
    allocates them."""
    if len(request.tensors) != len(names):
        raise BadRequest(f"tensors: expected {len(names)} ({', '.join(names)}), got {len(request.tensors)}")
    for name, serialized in zip(names, request.tensors, strict=True):
        if math.prod(serialized.size) > max_elements:
            raise BadRequest(f"{name}: shape {tuple(serialized.size)} exceeds this server's limits")
    try:
        return wire.tensors_of(request)
    except Exception as e:  # noqa: BLE001 (malformed tensor bytes are the client's fault)
        raise BadRequest(f"tensors: cannot decode ({e})") from None


async def _drain(stream: AsyncIterator) -> None:
    async for _ in stream:
        pass
