"""Shard messages above hivemind's 4 MiB unary message: chunked on the streaming RPCs, with the
server's bounds checked on each tensor's first chunk (unit), and a span served over real p2p with an
activation above 4 MiB, a request over the bound refused and a failing server banned (integration,
in-process DHTs)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterable

import pytest
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.proto import runtime_pb2

from potluck.hivemind_ext.dht import start_dht, visible_addresses
from potluck.peer.shard import streaming, wire
from potluck.peer.shard.blocks import load_block_span
from potluck.peer.shard.client.routing import Hop
from potluck.peer.shard.client.spans import ServerFailure, ShardClient
from potluck.peer.shard.server.service import ServerLimits, ShardServicer, serve_on, stop_serving

HIDDEN = 128  # the tiny model's


def _chunks(tensors: list[torch.Tensor], chunk_bytes: int = streaming.CHUNK_BYTES) -> list:
    return list(streaming.split(wire.request(tensors, start=0, end=2), chunk_bytes))


def _combine(parts: Iterable, max_bytes: int = 2**20, **bounds) -> runtime_pb2.ExpertRequest:
    async def stream():
        for part in parts:
            yield part

    return asyncio.run(streaming.combine(stream(), max_bytes, wire.BAD_REQUEST, chunk_bytes=1024, **bounds))


@pytest.mark.unit
def test_a_message_split_in_chunks_is_put_back_together_unchanged():
    tensors = [torch.randn(3, 5, 40), torch.arange(7)]
    parts = _chunks(tensors, chunk_bytes=1024)
    assert len(parts) == 3 + 1 and all(len(p.tensors) == 1 for p in parts)  # 2400 bytes: 3 chunks
    combined = _combine(parts)
    assert wire.metadata_of(combined) == {"start": 0, "end": 2}
    assert all(map(torch.equal, wire.tensors_of(combined), tensors))
    assert not streaming.needs_streaming(wire.request(tensors))


@pytest.mark.unit
def test_an_answer_ends_with_an_empty_message_and_the_reader_stops_there():
    """The caller hangs up once the answer's end arrives, before the server closes: a server that closed first lost
    the answer's last chunks now and then (p2pd reset the stream; streaming.py)."""
    response = wire.response([torch.randn(3, 1000, 100)])  # 1.2 MB: 2 chunks
    parts = list(streaming.answer(response))
    assert streaming.ends(parts[-1]) and parts[:-1] == list(streaming.split(response))

    async def read(parts):
        async def stream():  # the server's stream stays open after its answer
            for part in parts:
                yield part
            await asyncio.Event().wait()

        return await asyncio.wait_for(streaming.combine(stream(), 2**22, wire.INTERNAL), 60)

    (read_back,) = wire.unpack_response(asyncio.run(read(parts)))
    assert torch.equal(read_back, wire.unpack_response(response)[0])
    cut = [*parts[:-2], parts[-1]]  # the end where a chunk is due
    with pytest.raises(wire.RemoteError, match="tensor 0: 1 of 2 chunks arrived"):
        asyncio.run(read(cut))


def _declaring(chunks: int, chunk_bytes: int = 1024) -> list:
    """A stream whose tensor (4 KiB: 4 chunks of 1 KiB) declares ``chunks``: what a sender may lie about."""
    parts = _chunks([torch.zeros(1, 2, 512)], chunk_bytes)
    parts[0].tensors[0].chunks = chunks
    return parts


_NEXT_TENSOR = runtime_pb2.ExpertRequest(tensors=wire.request([torch.zeros(1)]).tensors)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("parts", "bounds", "problem"),
    [
        (_declaring(3), {}, "stream: tensor 0: more chunks than the 3 it declared"),
        (_declaring(4)[:3], {}, "stream: tensor 0: 3 of 4 chunks arrived"),  # ended early
        ([*_declaring(5), _NEXT_TENSOR], {}, "stream: tensor 0: 4 of 5 chunks arrived"),
        (_declaring(4)[1:], {}, "stream: tensor 0: its first chunk declares no dtype"),
        (_chunks([torch.zeros(1)]) * 2, {}, "stream: metadata: only the first chunk may carry it"),
        ([], {}, "stream: ended before its first chunk"),
        (_declaring(4), {"max_elements": 1000}, "stream: tensor 0: shape (1, 2, 512) exceeds the receiver"),
        (_declaring(4), {"max_bytes": 3000}, "stream: tensor 0: 4 chunks of up to 1024 bytes exceed the 3000"),
        (_declaring(1, chunk_bytes=4096), {}, "stream: tensor 0: a chunk of 4096 bytes, more than 1024"),
        (_declaring(3), {"max_bytes": 2500}, "stream: tensor 0: more than the 2500 bytes one stream may carry"),
        (_chunks([torch.zeros(1)] * 17), {}, "stream: more than 16 tensors"),
    ],
)  # fmt: skip
def test_a_malformed_stream_is_refused_naming_what_is_wrong(parts, bounds, problem):
    with pytest.raises(wire.RemoteError, match=re.escape(problem)) as error:
        _combine(parts, **bounds)
    assert error.value.kind == wire.BAD_REQUEST


class _Sender:
    """A client's side of a stream: the chunks the server has read so far are counted."""

    def __init__(self, parts: list):
        self.parts, self.read = parts, 0
        self.all_read = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator:
        for part in self.parts:
            self.read += 1
            yield part
        self.all_read.set()


@pytest.fixture(scope="module")
def servicer(tiny_assets):
    servicer = ShardServicer(load_block_span(tiny_assets["model"], 0, 2), "streams", ServerLimits())
    yield servicer
    servicer.shutdown()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("declared", "problem"),
    [
        ((4096, 64, HIDDEN), "tensor 0: shape (4096, 64, 128) exceeds the receiver's limits"),
        # within max_request_tokens × hidden_size elements, but more bytes than max_stream_bytes allows
        ((16, 64, HIDDEN), "tensor 0: 32 chunks of up to 1048576 bytes exceed the 16777216 bytes"),
    ],
)
def test_a_stream_declaring_more_than_the_servers_bound_is_refused_before_it_is_read(
    servicer, monkeypatch, declared, problem
):
    monkeypatch.setattr(servicer, "limits", ServerLimits(max_stream_bytes=16 * 2**20))
    parts = _chunks([torch.zeros(1, 2, HIDDEN)])
    parts[0].tensors[0].size[:] = declared
    parts[0].tensors[0].chunks = 32
    sender = _Sender(
        parts + [runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(buffer=b"0" * 2**20)])] * 31
    )

    async def first_answer():
        responses = servicer.rpc_forward_stream(sender.__aiter__(), None)
        answer = await anext(responses)
        read_when_refused = sender.read
        end = await anext(responses)
        # until the caller hangs up, the server reads the rest of the stream and discards it
        hanging_up = asyncio.ensure_future(anext(responses))
        await asyncio.wait_for(sender.all_read.wait(), 60)
        hanging_up.cancel()  # the caller hangs up: hivemind cancels the handler
        with contextlib.suppress(asyncio.CancelledError):
            await hanging_up
        return answer, read_when_refused, end

    answer, read_when_refused, end = asyncio.run(first_answer())
    assert streaming.ends(end)
    with pytest.raises(wire.RemoteError, match=re.escape(f"forward: stream: {problem}")) as error:
        wire.unpack_response(answer)
    assert error.value.kind == wire.BAD_REQUEST
    assert read_when_refused == 1  # refused on the first chunk, before buffering the other 31 MiB
    assert sender.read == 32

    # the server keeps serving: a streamed request of several chunks gets the unary path's answer
    hidden = torch.randn(40, 40, HIDDEN)  # 800 KiB per tensor: two chunks of 512 KiB each
    grad_output = torch.randn_like(hidden)
    request = wire.request([hidden, grad_output], start=0, end=2)

    async def both_ways():
        unary = await servicer._handle("backward", request, servicer._backward)
        responses = servicer.rpc_backward_stream(
            _Sender(_chunks([hidden, grad_output], 2**19)).__aiter__(), None
        )
        return unary, await streaming.combine(responses, request.ByteSize(), wire.INTERNAL)

    unary, streamed = asyncio.run(both_ways())
    torch.testing.assert_close(wire.unpack_response(streamed), wire.unpack_response(unary), atol=0, rtol=0)


@pytest.fixture
def served(tiny_assets):
    """The tiny model's two blocks served over p2p by an in-process servicer, and a client of it."""
    servicer = ShardServicer(load_block_span(tiny_assets["model"], 0, 2), "streams", ServerLimits())
    server_dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    p2p = RemoteExpertWorker.run_coroutine(server_dht.replicate_p2p())
    RemoteExpertWorker.run_coroutine(serve_on(p2p, servicer))
    client_dht = start_dht(visible_addresses(server_dht), ["/ip4/127.0.0.1/tcp/0"], [], None)
    client = ShardClient(client_dht, "streams", 2, request_timeout=60.0)
    try:
        yield servicer, client, Hop(str(server_dht.peer_id), 0, 2)
    finally:
        client.shutdown()
        client_dht.shutdown()
        RemoteExpertWorker.run_coroutine(stop_serving(p2p, servicer))
        RemoteExpertWorker.run_coroutine(p2p.shutdown())
        servicer.shutdown()
        server_dht.shutdown()


@pytest.mark.integration
def test_an_activation_above_4_mib_goes_through_a_span_and_back_with_the_unary_paths_failover(
    served, tiny_assets
):
    servicer, client, hop = served
    torch.manual_seed(0)
    hidden = torch.randn(256, 40, HIDDEN)  # 5 MiB; with its gradient the backward request is 10 MiB
    grad_output = torch.randn_like(hidden)
    assert streaming.needs_streaming(wire.request([hidden]))

    (output,) = client.call(hop, "forward", [hidden])
    (grad_input,) = client.call(hop, "backward", [hidden, grad_output])

    local = load_block_span(tiny_assets["model"], 0, 2)
    leaf = hidden.clone().requires_grad_(True)
    expected = local(leaf, 0)
    expected.backward(grad_output)
    torch.testing.assert_close(output, expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_input, leaf.grad, atol=1e-5, rtol=0)
    assert client.metrics.failures == 0

    # a request over the server's bound is the caller's fault: with no other server to ask, raised in one line, and
    # the server, which was right, not left banned
    servicer.limits = ServerLimits(max_stream_bytes=8 * 2**20)
    refused = r"backward: stream: tensor 1: .* exceed the 8388608 bytes .*; no other server is left to ask"
    with pytest.raises(wire.RemoteError, match=refused) as error:
        client.backward([(hop, hidden)], grad_output)
    assert error.value.kind == wire.BAD_REQUEST and not client.router.is_banned(hop.peer_id)
    assert client.metrics.refused == client.metrics.failures == 1
    (again,) = client.call(hop, "forward", [hidden])  # and it keeps serving
    assert torch.equal(again, output)

    # a server failing a streamed request is banned and the caller told to fail over, as on the unary path
    async def broken(request):
        raise RuntimeError("out of memory")

    servicer._forward = broken
    with pytest.raises(ServerFailure, match="forward: RuntimeError: out of memory"):
        client.call(hop, "forward", [hidden])
    assert client.router.is_banned(hop.peer_id) and client.metrics.failures == 2


@pytest.mark.unit
def test_streams_over_the_servers_count_are_busy_and_a_stalled_one_is_refused_in_time(servicer, monkeypatch):
    """What streams may hold at once is bounded: ``max_streams`` of them, each arriving within ``stream_timeout``."""
    monkeypatch.setattr(servicer, "limits", ServerLimits(max_streams=1, stream_timeout=0.5))
    arrived = asyncio.Event()

    async def stalled() -> AsyncIterator:
        yield _declaring(4)[0]  # the first of 4 chunks, then nothing
        arrived.set()
        await asyncio.Event().wait()  # and never the rest

    async def scenario():
        holding = asyncio.ensure_future(anext(servicer.rpc_forward_stream(stalled(), None)))
        await arrived.wait()
        second = await anext(
            servicer.rpc_forward_stream(iter_parts(_chunks([torch.zeros(1, 2, HIDDEN)])), None)
        )
        return await holding, second

    async def iter_parts(parts):
        for part in parts:
            yield part

    held, second = asyncio.run(scenario())
    with pytest.raises(wire.RemoteError, match=r"too many streamed requests at once \(1\)") as busy:
        wire.unpack_response(second)
    assert busy.value.kind == wire.BUSY
    with pytest.raises(wire.RemoteError, match="stream: not all of it arrived within 0.5 s") as stalled_error:
        wire.unpack_response(held)
    assert stalled_error.value.kind == wire.BAD_REQUEST
    assert servicer._streams == 0
