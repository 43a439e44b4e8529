"""Shard messages above hivemind's 4 MiB unary message: split in chunks and put back together, with
the receiver's bounds checked on each tensor's first chunk."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable

import pytest
import torch
from hivemind.proto import runtime_pb2

from potluck.peer.shard import streaming, wire


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
