"""Fuzz a block-span server and an expert server through real p2p calls: every malformed request gets an
error of kind ``bad_request`` within a bound (or, for bytes that are no protobuf, hivemind's refusal), never
``internal``; the servers keep serving, and afterwards answer valid requests with what the local blocks and
expert compute.

Both servicers run in this process on a replica of a real DHT's p2p daemon, as ``run-peer --role shard`` and
``--role experts`` register theirs; the fuzzer is a second DHT node's p2p client. Raw bytes go on the wire as
they are (:class:`Raw`); typed requests carry random metadata and tensors, tensors whose headers lie (declared
size, dtype, codec, chunk count) or whose buffers are cut, and streams that are cut, reordered, padded with
garbage or stalled. The servers' own counters (``potluck_shard_request_failures``) must show each refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hypothesis import given
from hypothesis import strategies as st

from potluck.hivemind_ext.dht import start_dht, visible_addresses
from potluck.hivemind_ext.p2p import MAX_FRAME_BYTES
from potluck.peer.shard import streaming, wire
from potluck.peer.shard.blocks import load_block_span
from potluck.peer.shard.experts import load_experts
from potluck.peer.shard.server.expert_service import ExpertServicer, ServedExperts
from potluck.peer.shard.server.service import ServerLimits, ShardServicer, serve_on, stop_serving
from potluck.protocols.experts import parse_uid
from potluck.protocols.runspec import parse_run_spec
from tests.fuzzing import ANSWER_WITHIN, Raw, fuzz_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FUZZ = fuzz_settings(max_examples=500)
STREAM_TIMEOUT = 2.0
"""The servers' ``stream_timeout``: a stalled stream is refused after this long."""
HIDDEN = 128  # both tiny models'
RUN = "fuzz"
UID = "0.1"  # the expert served
SPAN = ShardServicer.__name__
EXPERT = ExpertServicer.__name__


@dataclass
class Served:
    span: ShardServicer
    experts: ExpertServicer
    client: P2P
    peer: PeerID
    errors_seen: Counter = field(default_factory=Counter)
    """(servicer, kind) -> error answers the fuzzer received: what the servers' counters must show."""

    def call(self, servicer: str, method: str, message, output=runtime_pb2.ExpertResponse):
        """One unary call, answered within :data:`ANSWER_WITHIN` seconds."""
        call = self.client.call_protobuf_handler(self.peer, f"{servicer}.rpc_{method}", message, output)
        reply = RemoteExpertWorker.run_coroutine(asyncio.wait_for(call, ANSWER_WITHIN))
        if output is runtime_pb2.ExpertResponse:
            self._seen(servicer, reply)
        return reply

    def _seen(self, servicer: str, reply: runtime_pb2.ExpertResponse) -> None:
        meta = wire.metadata_of(reply, wire.INTERNAL)
        if "error" in meta:
            self.errors_seen[servicer, meta["kind"]] += 1

    def stream(self, servicer: str, method: str, messages: list, stall: bool = False) -> list:
        """The responses to ``messages`` sent on ``method``'s streaming twin (``stall``: the stream then stays
        open), read until the server's empty message ends its answer, or it ends the stream, or, when stalled,
        sends its first answer; then this side hangs up, as ``streaming.call`` does."""
        name = f"{servicer}.rpc_{method}_stream"

        async def sent() -> AsyncIterator:
            for message in messages:
                yield message
            if stall:
                await asyncio.Event().wait()  # never set: the caller goes quiet, the stream stays open

        async def exchange() -> list:
            responses = await self.client.iterate_protobuf_handler(
                self.peer, name, sent(), runtime_pb2.ExpertResponse
            )
            answers = []
            try:
                async for response in responses:
                    if answers and streaming.ends(response):
                        break
                    answers.append(response)
                    if stall:
                        break
            finally:
                await responses.aclose()
            return answers

        answers = RemoteExpertWorker.run_coroutine(asyncio.wait_for(exchange(), ANSWER_WITHIN))
        if answers:  # one request: the first chunk of the answer carries its metadata
            self._seen(servicer, answers[0])
        return answers


def counted_failures(servicer) -> Counter:
    """What ``servicer``'s Prometheus counters say it refused or failed, by kind, over every method."""
    counted = Counter()
    for metric in servicer.metrics.registry.collect():
        if metric.name == "potluck_shard_request_failures":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    counted[sample.labels["kind"]] += sample.value
    return counted


@pytest.fixture(scope="module")
def served(tiny_assets, family_model):
    limits = ServerLimits(stream_timeout=STREAM_TIMEOUT, max_streams=64)
    span = ShardServicer(load_block_span(tiny_assets["model"], 0, 2), RUN, limits)
    spec = parse_run_spec({"run_id": RUN, "model": {"name_or_path": str(family_model("mixtral"))},
                           "data": {"path": "x"}, "optimizer": {"lr": 0.01},
                           "batch": {"target_batch_size": 1, "per_peer_batch_size": 1}})  # fmt: skip
    experts = ExpertServicer(
        ServedExperts(load_experts(family_model("mixtral"), [(0, 1)]), spec), RUN, HIDDEN, limits
    )
    server_dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    client_dht = start_dht(visible_addresses(server_dht), ["/ip4/127.0.0.1/tcp/0"], [], None)
    p2p = RemoteExpertWorker.run_coroutine(server_dht.replicate_p2p())
    client = RemoteExpertWorker.run_coroutine(client_dht.replicate_p2p())
    try:
        for servicer in (span, experts):
            RemoteExpertWorker.run_coroutine(serve_on(p2p, servicer))
        yield Served(span, experts, client, server_dht.peer_id)
    finally:
        for servicer in (span, experts):
            with contextlib.suppress(Exception):
                RemoteExpertWorker.run_coroutine(stop_serving(p2p, servicer))
            servicer.shutdown()
        for replica in (client, p2p):
            RemoteExpertWorker.run_coroutine(replica.shutdown())
        client_dht.shutdown()
        server_dht.shutdown()


def refused(reply: runtime_pb2.ExpertResponse, also: tuple[str, ...] = ()) -> str:
    """The error a reply carries; it must be the caller's fault (``bad_request``, or a kind in ``also``)."""
    meta = wire.metadata_of(reply, wire.INTERNAL)
    assert "error" in meta, f"a malformed request was answered with a result: {meta}"
    assert meta["kind"] in (wire.BAD_REQUEST, *also), meta
    return meta["error"]


def kind_of(reply: runtime_pb2.ExpertResponse) -> str | None:
    """None for a result, else the error's kind; an ``internal`` error (a handler that failed) fails the test."""
    meta = wire.metadata_of(reply, wire.INTERNAL)
    assert meta.get("kind") != wire.INTERNAL, meta
    return meta.get("kind")


def not_a_protobuf(error: Exception) -> bool:
    """hivemind's answer to unary bytes that do not parse as the handler's request type."""
    return isinstance(error, P2PHandlerError) and "DecodeError" in str(error)


# -- bytes on the wire -----------------------------------------------------------------------------

METHODS = [
    (SPAN, m) for m in ("forward", "backward", "inference", "close_session", "adapter_state", "info")
] + [(EXPERT, m) for m in ("forward", "backward", "expert_state", "idle_steps", "info")]


@FUZZ
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=512))
def test_random_bytes_get_an_error(served, method, payload):
    servicer, name = method
    output = runtime_pb2.ExpertInfo if name == "info" else runtime_pb2.ExpertResponse
    try:
        reply = served.call(servicer, name, Raw(payload), output)
    except P2PHandlerError as e:
        assert not_a_protobuf(e), e
        return
    if name == "info":  # asks nothing: whatever the bytes, the server describes itself
        assert MSGPackSerializer.loads(reply.serialized_info)["run_id"] == RUN
    elif name != "close_session":  # closing a session nobody opened is no error
        refused(reply)


def valid_request(servicer: str) -> runtime_pb2.ExpertRequest:
    if servicer == SPAN:
        return wire.request([torch.randn(2, 3, HIDDEN)], start=0, end=2, position_offset=0)
    return wire.request([torch.randn(3, HIDDEN)], uid=UID)


@FUZZ
@given(servicer=st.sampled_from([SPAN, EXPERT]), data=st.data())
def test_truncated_requests_get_an_error(served, servicer, data):
    payload = valid_request(servicer).SerializeToString()
    cut = data.draw(st.integers(0, len(payload) - 1))
    try:
        refused(served.call(servicer, "forward", Raw(payload[:cut])))
    except P2PHandlerError as e:
        assert not_a_protobuf(e), e


# -- typed requests: random metadata and tensors ---------------------------------------------------

int64s = st.integers(-(2**63), 2**63 - 1)
values = (
    st.integers(-3, 70)
    | int64s
    | st.none()
    | st.booleans()
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=8)
    | st.lists(st.integers(-3, 70), max_size=5)
)
span_metadata = st.fixed_dictionaries(
    {},
    optional={
        "start": st.sampled_from([0, 1]) | values,
        "end": st.sampled_from([1, 2]) | values,
        "position_offset": st.sampled_from([0, 4]) | values,
        "prefix_tokens": st.sampled_from([0, 2]) | values,
        "padding": values,
        "adapter": values,
        "session": st.sampled_from(["s1", "s2"]) | values,
    },
)
expert_metadata = st.fixed_dictionaries(
    {}, optional={"uid": st.sampled_from([UID, "1.2", "0.01", "x.y"]) | values}
)
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
]
FILLS = {
    "randn": lambda shape: torch.randn(shape),
    "nan": lambda shape: torch.full(shape, math.nan),
    "inf": lambda shape: torch.full(shape, -math.inf),
    "huge": lambda shape: torch.full(shape, 3e38),
}


@st.composite
def tensors(draw) -> torch.Tensor:
    shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 7, HIDDEN, 300]), max_size=4))
    if math.prod(shape) > 2**16:
        shape = shape[:2]
    return FILLS[draw(st.sampled_from(sorted(FILLS)))](shape).to(draw(st.sampled_from(DTYPES)))


@FUZZ
@given(
    servicer=st.sampled_from([SPAN, EXPERT]),
    method=st.sampled_from(["forward", "backward"]),
    data=st.data(),
    tensor_list=st.lists(tensors(), max_size=3),
)
def test_random_metadata_and_tensors_are_refused_or_computed(served, servicer, method, data, tensor_list):
    metadata = data.draw(span_metadata if servicer == SPAN else expert_metadata)
    reply = served.call(servicer, method, wire.request(tensor_list, **metadata))
    if kind_of(reply) is None:  # a valid request after all: its result has the input's shape, finite
        (result,) = wire.unpack_response(reply)
        assert result.shape == tensor_list[0].shape and torch.isfinite(result).all()


@FUZZ
@given(
    uids=values | st.lists(st.sampled_from([UID, "1.2", "0.01", "x.y"]) | values, max_size=6),
    tensor_list=st.lists(tensors(), max_size=2),
)
def test_random_idle_steps_are_refused_or_taken(served, uids, tensor_list):
    reply = served.call(EXPERT, "idle_steps", wire.request(tensor_list, uids=uids))
    if (
        kind_of(reply) is None
    ):  # only a list naming the served expert once is a valid request ("0.01" names it too)
        assert isinstance(uids, list) and [parse_uid(u) for u in uids] == [parse_uid(UID)], uids
        assert wire.unpack_response(reply) == []


@st.composite
def lying_tensors(draw) -> runtime_pb2.Tensor:
    """A serialised tensor whose header says something else than its buffer holds."""
    tensor = serialize_torch_tensor(torch.randn(2, 3, HIDDEN))
    lie = draw(st.sampled_from(["size", "buffer", "dtype", "compression", "chunks"]))
    if lie == "size":
        tensor.size[:] = draw(st.lists(st.integers(0, 2**32 - 1), max_size=5))
    elif lie == "buffer":
        tensor.buffer = tensor.buffer[: draw(st.integers(0, len(tensor.buffer) - 1))]
    elif lie == "dtype":
        tensor.dtype = draw(
            st.sampled_from(["", "float128", "object", "V8", "<U4", "M8", "bogus"]) | st.text(max_size=8)
        )
    elif lie == "compression":
        tensor.compression = draw(st.integers(1, 12))
    else:
        tensor.chunks = draw(st.integers(-(2**31), 2**31 - 1))
    return tensor


@FUZZ
@given(
    servicer=st.sampled_from([SPAN, EXPERT]),
    method=st.sampled_from(["forward", "backward"]),
    lie=lying_tensors(),
)
def test_tensors_whose_headers_lie_are_refused(served, servicer, method, lie):
    request = valid_request(servicer)
    request.tensors[0].CopyFrom(lie)
    if method == "backward":
        request.tensors.append(lie)
    reply = served.call(servicer, method, request)
    if kind_of(reply) is not None:
        return
    # only a lie that changes nothing (chunks on a unary call; the codec NONE) may be computed
    assert lie.size == [2, 3, HIDDEN] and lie.dtype == "float32" and lie.compression in (0,), lie


# -- streams ---------------------------------------------------------------------------------------


@st.composite
def broken_streams(draw, servicer: str) -> tuple[list, bool]:
    """A valid forward request (2 or 3 tensor chunks of 1 KiB) as a stream, broken one way: ``(messages,
    garbage)``, ``garbage`` when a message is no protobuf at all (hivemind may then hang up without an answer)."""
    chunks = list(streaming.split(valid_request(servicer), chunk_bytes=1024))
    declared = (len(chunks), list(chunks[0].tensors[0].size))
    how = draw(st.sampled_from(["drop", "duplicate", "swap", "garbage", "chunks", "size", "cut", "metadata"]))
    i = draw(st.integers(0, len(chunks) - 1))
    if how == "drop":
        del chunks[i]
    elif how == "duplicate":
        chunks.insert(i, chunks[i])
    elif how == "swap":
        chunks[0], chunks[-1] = chunks[-1], chunks[0]
    elif how == "garbage":
        chunks.insert(i, Raw(draw(st.binary(min_size=1, max_size=64))))
    elif how == "chunks":
        chunks[0].tensors[0].chunks = draw(
            st.integers(-(2**31), 2**31 - 1).filter(lambda n: n != declared[0])
        )
    elif how == "size":
        chunks[0].tensors[0].size[:] = draw(
            st.lists(st.integers(0, 2**32 - 1), max_size=4).filter(lambda s: s != declared[1])
        )
    elif how == "cut":
        buffer = chunks[i].tensors[0].buffer
        chunks[i].tensors[0].buffer = buffer[: draw(st.integers(0, len(buffer) - 1))]
    else:
        chunks[i].metadata = draw(st.binary(min_size=1, max_size=16))
    return chunks, how == "garbage"


@FUZZ
@given(servicer=st.sampled_from([SPAN, EXPERT]), data=st.data())
def test_broken_streams_get_an_error_or_a_hang_up(served, servicer, data):
    messages, garbage = data.draw(broken_streams(servicer))
    try:
        answers = served.stream(servicer, "forward", messages)
    except P2PHandlerError as e:
        # hivemind's reader failed on bytes that are no protobuf, and said so
        assert garbage and "DecodeError" in str(e), e
        return
    except ConnectionResetError:
        # hivemind's reader hung up on bytes that are no protobuf, and the daemon reset the stream rather than
        # closing it (it resets on any error copying it: 1 example in a suite run)
        assert garbage
        return
    if garbage and not answers:
        return  # hivemind's reader hung up on bytes that are no protobuf
    assert len(answers) == 1, answers
    refused(answers[0])  # bytes that happen to parse make a chunk that is out of place: refused too


def test_a_stalled_stream_is_refused_after_the_stream_timeout_and_others_are_served_meanwhile(served):
    chunks = list(streaming.split(valid_request(SPAN), chunk_bytes=1024))
    with ThreadPoolExecutor(1) as background:
        pending = background.submit(served.stream, SPAN, "forward", chunks[:2], stall=True)
        (output,) = wire.unpack_response(
            served.call(SPAN, "forward", valid_request(SPAN))
        )  # served meanwhile
        assert output.shape == (2, 3, HIDDEN) and not pending.done()
        (answer,) = pending.result(timeout=STREAM_TIMEOUT + ANSWER_WITHIN)
    assert f"not all of it arrived within {STREAM_TIMEOUT:g} s" in refused(answer)


@fuzz_settings(max_examples=100)  # each waits a moment for an answer
@given(
    declared=st.integers(0, 2**64 - 1), sent=st.binary(max_size=64), marker=st.binary(min_size=1, max_size=1)
)
def test_stream_frames_whose_length_lies_leave_the_server_serving(served, declared, sent, marker):
    """A frame on hivemind's stream wire (a marker byte, 8 bytes of length, the message) that declares more or
    less than it carries, then the caller leaves: nothing is allocated from the declared length, and the
    server still answers."""

    async def lie():
        _, reader, writer = await served.client.call_binary_stream_handler(
            served.peer, f"{SPAN}.rpc_forward_stream"
        )
        writer.write(marker + declared.to_bytes(8, "big") + sent)
        await writer.drain()
        # whatever the server makes of it, it answers or waits for the rest; the caller leaves
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            await asyncio.wait_for(reader.read(1), 0.05)
        writer.close()

    RemoteExpertWorker.run_coroutine(asyncio.wait_for(lie(), ANSWER_WITHIN))
    (output,) = wire.unpack_response(served.call(SPAN, "forward", valid_request(SPAN)))
    assert output.shape == (2, 3, HIDDEN)


def test_a_stream_frame_declared_above_the_bound_is_refused_unread(served):
    """hivemind would wait for the 64 MiB + 1 bytes and hold them all before parsing (hivemind_ext/p2p.py)."""

    async def declare_too_much() -> bytes:
        _, reader, writer = await served.client.call_binary_stream_handler(
            served.peer, f"{SPAN}.rpc_forward_stream"
        )
        try:
            writer.write(b"\x00" + (MAX_FRAME_BYTES + 1).to_bytes(8, "big") + b"\x00" * 1024)
            await writer.drain()
            return await reader.read()  # the server hangs up: end of stream
        finally:
            writer.close()

    assert RemoteExpertWorker.run_coroutine(asyncio.wait_for(declare_too_much(), ANSWER_WITHIN)) == b""
    (output,) = wire.unpack_response(served.call(SPAN, "forward", valid_request(SPAN)))
    assert output.shape == (2, 3, HIDDEN)


# -- inference sessions ----------------------------------------------------------------------------


@FUZZ
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["s1", "s2", "", "x" * 65]) | st.text(max_size=3),  # session id
            st.sampled_from([0, 1, 3, 5, 64]) | st.integers(-2, 100),  # position offset
            st.integers(1, 3),  # rows
            st.integers(1, 4),  # tokens
        ),
        min_size=1,
        max_size=4,
    )
)
def test_inference_steps_with_wrong_sessions_and_offsets_are_refused_and_sessions_close(served, steps):
    for session, offset, rows, tokens in steps:
        request = wire.request(
            [torch.randn(rows, tokens, HIDDEN)], start=0, end=2, position_offset=offset, session=session
        )
        kind = kind_of(served.call(SPAN, "inference", request))
        assert kind in (None, wire.BAD_REQUEST), kind
    for session, *_ in steps:
        assert kind_of(served.call(SPAN, "close_session", wire.request([], session=session))) is None
    assert served.span.sessions == {}  # every session this client opened is closed, its cache freed


# -- afterwards ------------------------------------------------------------------------------------


def test_the_servers_still_serve_correctly_and_counted_each_refusal(served, tiny_assets):
    # Runs last in this module (pytest keeps file order), after every fuzz test above.
    torch.manual_seed(0)
    hidden, grad_output = torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
    local = load_block_span(tiny_assets["model"], 0, 2)
    leaf = hidden.clone().requires_grad_(True)
    expected = local(leaf, 0)
    expected.backward(grad_output)
    (output,) = wire.unpack_response(served.call(SPAN, "forward", wire.request([hidden], start=0, end=2)))
    (grad_input,) = wire.unpack_response(
        served.call(SPAN, "backward", wire.request([hidden, grad_output], start=0, end=2))
    )
    torch.testing.assert_close(output, expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_input, leaf.grad, atol=1e-5, rtol=0)

    # an inference session of two steps ends where the forward pass of all its tokens does
    steps = [wire.request([hidden[:, :3]], start=0, end=2, session="after"),
             wire.request([hidden[:, 3:]], start=0, end=2, session="after", position_offset=3)]  # fmt: skip
    outputs = [wire.unpack_response(served.call(SPAN, "inference", step))[0] for step in steps]
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected.detach(), atol=1e-5, rtol=0)

    tokens = torch.randn(4, HIDDEN)
    (expert_output,) = wire.unpack_response(served.call(EXPERT, "forward", wire.request([tokens], uid=UID)))
    torch.testing.assert_close(
        expert_output, served.experts.served.forward((0, 1), tokens), atol=1e-6, rtol=0
    )

    for name, servicer in ((SPAN, served.span), (EXPERT, served.experts)):
        seen = {kind: count for (to, kind), count in served.errors_seen.items() if to == name}
        assert seen[wire.BAD_REQUEST] >= 200, seen  # the fuzzing reached the handlers
        counted = counted_failures(servicer)
        # each refusal counted (a lying frame's may be counted unseen, its caller gone); none failed inside
        assert counted[wire.BAD_REQUEST] >= seen[wire.BAD_REQUEST]
        assert {kind: n for kind, n in counted.items() if kind != wire.BAD_REQUEST} == {
            kind: n for kind, n in seen.items() if kind != wire.BAD_REQUEST
        }
