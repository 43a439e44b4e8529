"""How one shard message travels when it is too big for a hivemind unary call (4 MiB): in chunks, on
a streaming RPC, put back together on the other side with bounds checked as the chunks arrive.

A streamed message is a sequence of messages of its own type. The first carries the metadata; the
tensors follow as hivemind's ``split_for_streaming`` parts (a tensor's first part declares its dtype,
shape and number of chunks, the others carry bytes only), at most :data:`CHUNK_BYTES` each. The
receiver checks a tensor's declared shape and chunk count on its first part, before it buffers the
tensor, and counts bytes as they arrive; a stream with more chunks than declared, one that ends before
they all arrived or one that carries more than the receiver's bound raises :class:`wire.RemoteError`
naming what is wrong, of the kind the receiver gives (``bad_request`` on a server; ``internal`` on a
client, which then fails over). A message whose first part carries no tensor is complete.

A server's answer ends with an empty message (:func:`answer`), and the server leaves the stream open until the
caller hangs up (for at most :data:`HANG_UP_WITHIN`). hivemind's streams have no end of their own from server to
client: the server closes its end, and its p2pd (``doStreamPipe``) then closes the libp2p stream from one goroutine
while another, blocked reading the caller's side, sees the read side close and resets the stream; a reset that
lands first makes the caller's p2pd drop what it had buffered and not yet passed on. Measured on loopback with one
core busy, a forward and a backward of 5 MiB answers per round: 2 of 1,268 rounds lost the end of their last chunk
when the server closed first, 0 of 699 with the end message (CHANGELOG, 2026-12-08). The caller, which knows where
the answer ends, hangs up first.
An empty message after the first ends any stream (a request's too: hivemind's own end follows it).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Iterator
from typing import NoReturn, TypeVar

from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import iter_as_aiter
from hivemind.utils.streaming import split_for_streaming

from potluck.peer.shard import wire

Message = TypeVar("Message", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)

UNARY_BYTES = DEFAULT_MAX_MSG_SIZE - 2**16
"""The largest serialized message sent as one unary call: hivemind's cap less room for its envelope."""
CHUNK_BYTES = 2**20
"""Tensor bytes per chunk. A server holds a few chunks per stream in hivemind's read-ahead queue."""
MAX_TENSORS = 16
"""Tensors one streamed message may carry: more than any shard method sends."""
HANG_UP_WITHIN = 30.0
"""Seconds a server keeps a stream open after its answer, for the caller to hang up first."""


def needs_streaming(message: Message) -> bool:
    return message.ByteSize() > UNARY_BYTES


def split(message: Message, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Message]:
    """``message`` as a stream: the metadata and the first chunk, then one chunk per message."""
    parts = [part for tensor in message.tensors for part in split_for_streaming(tensor, chunk_bytes)]
    yield type(message)(metadata=message.metadata, tensors=parts[:1])
    for part in parts[1:]:
        yield type(message)(tensors=[part])


def ends(message: Message) -> bool:
    """Whether ``message``, after a stream's first, is the empty message that ends it."""
    return not message.metadata and not message.tensors


def answer(message: runtime_pb2.ExpertResponse) -> Iterator[runtime_pb2.ExpertResponse]:
    """A server's ``message`` as a stream: :func:`split`, then the empty message that ends it."""
    yield from split(message)
    yield runtime_pb2.ExpertResponse()


async def combine(
    stream: AsyncIterator[Message],
    max_bytes: int,
    fault: str,
    max_elements: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Message:
    """The message that ``stream`` carries, holding at most ``max_bytes`` of tensor bytes and, per
    tensor, at most ``max_elements`` elements by its declared shape; ``fault``: the kind of
    :class:`wire.RemoteError` a malformed stream raises."""
    assembly = _Assembly(max_bytes, max_elements, chunk_bytes, fault)
    async for message in stream:
        if assembly.add(message):
            break
    return assembly.finish()


async def call(
    rpc: Callable, request: runtime_pb2.ExpertRequest, response_bytes: int | None = None
) -> runtime_pb2.ExpertResponse:
    """``request`` sent in chunks through a streaming stub method, and its response put back together.
    A pass's response carries no more tensor bytes than its request (hidden states in; hidden states
    or their gradient out), a state download's ``response_bytes``; more is the server's fault. Once the answer's
    end arrived the stream is closed from this side (see the module's docstring)."""
    responses = await rpc(iter_as_aiter(split(request)))
    try:
        return await combine(responses, max(request.ByteSize(), response_bytes or 0), wire.INTERNAL)
    finally:
        await responses.aclose()  # hangs up, also when the server refused the request half-sent


class _Assembly:
    def __init__(self, max_bytes: int, max_elements: int | None, chunk_bytes: int, fault: str):
        self.max_bytes, self.max_elements, self.chunk_bytes, self.fault = (
            max_bytes,
            max_elements,
            chunk_bytes,
            fault,
        )
        self.first: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse | None = None
        self.tensors: list[runtime_pb2.Tensor] = []
        self.chunks: list[list[bytes]] = []
        self.bytes = 0

    def add(self, message) -> bool:
        """Take the stream's next message; True when the message is complete without further ones."""
        if self.first is None:
            self.first = message
        elif ends(message):  # the message must be complete
            self._check_complete()
            return True
        elif message.metadata:
            self._refuse("metadata: only the first chunk may carry it")
        for part in message.tensors:
            if part.dtype:  # a tensor's first chunk
                self._check_complete()
                self._start(part)
            elif not self.tensors:
                self._refuse("tensor 0: its first chunk declares no dtype")
            elif len(self.chunks[-1]) == self._declared(self.tensors[-1]):
                self._refuse(f"tensor {len(self.tensors) - 1}: more chunks than the "
                             f"{self._declared(self.tensors[-1])} it declared")  # fmt: skip
            self._take(part.buffer)
        return not self.tensors

    def finish(self):
        if self.first is None:
            self._refuse("ended before its first chunk")
        self._check_complete()
        message = type(self.first)(metadata=self.first.metadata)
        for tensor, chunks in zip(self.tensors, self.chunks, strict=True):
            tensor.buffer = b"".join(chunks)
            message.tensors.append(tensor)
        return message

    def _start(self, part: runtime_pb2.Tensor) -> None:
        index = len(self.tensors)
        if index == MAX_TENSORS:
            self._refuse(f"more than {MAX_TENSORS} tensors")
        if self.max_elements is not None and math.prod(part.size) > self.max_elements:
            self._refuse(f"tensor {index}: shape {tuple(part.size)} exceeds the receiver's limits "
                         f"({self.max_elements} elements)")  # fmt: skip
        declared = self._declared(part)
        # the least its chunks can carry, refused before any is buffered
        if (declared - 1) * self.chunk_bytes >= self.max_bytes - self.bytes:
            self._refuse(f"tensor {index}: {declared} chunks of up to {self.chunk_bytes} bytes exceed "
                         f"the {self.max_bytes} bytes one stream may carry")  # fmt: skip
        tensor = runtime_pb2.Tensor()
        tensor.CopyFrom(part)
        tensor.buffer = b""
        self.tensors.append(tensor)
        self.chunks.append([])

    def _take(self, buffer: bytes) -> None:
        index = len(self.tensors) - 1
        if len(buffer) > self.chunk_bytes:
            self._refuse(f"tensor {index}: a chunk of {len(buffer)} bytes, more than {self.chunk_bytes}")
        self.bytes += len(buffer)
        if self.bytes > self.max_bytes:
            self._refuse(f"tensor {index}: more than the {self.max_bytes} bytes one stream may carry")
        self.chunks[-1].append(buffer)

    def _check_complete(self) -> None:
        if self.tensors and len(self.chunks[-1]) < self._declared(self.tensors[-1]):
            self._refuse(f"tensor {len(self.tensors) - 1}: {len(self.chunks[-1])} of "
                         f"{self._declared(self.tensors[-1])} chunks arrived")  # fmt: skip

    @staticmethod
    def _declared(part: runtime_pb2.Tensor) -> int:
        return max(part.chunks, 1)  # an empty tensor travels as one empty chunk that declares 0

    def _refuse(self, problem: str) -> NoReturn:
        raise wire.RemoteError(f"stream: {problem}", self.fault)
