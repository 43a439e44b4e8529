"""The shard protocol's messages: hivemind's ``ExpertRequest``/``ExpertResponse`` protobufs carrying
tensors (hivemind's tensor serialisation) and MessagePack metadata.

Request metadata: ``start``/``end`` (the sub-span of the server's blocks to run), ``position_offset``
(absolute position of the first token), ``session`` (inference only), ``padding`` (optional: each
row's count of left pads, which the row's tokens neither attend to nor count in their positions; an
inference session keeps its first step's, and every later step must repeat it). A response either carries the
result tensors or ``{"error": message, "kind": kind}``: ``bad_request`` says the request is malformed (the
caller's fault, by the server's word: a client fails over as for the others, and raises it only when a second server
refuses the same request too, ``client/refusals.py``), ``busy`` and ``internal`` make the client fail over.
"""

from __future__ import annotations

from typing import Any

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

BAD_REQUEST, BUSY, INTERNAL = "bad_request", "busy", "internal"
FORBIDDEN = "forbidden"
"""The caller holds no valid access token for the server's private run (``hivemind_ext/access.py``)."""


class RemoteError(RuntimeError):
    """The server refused or failed a request; ``kind`` says whose fault it was."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def request(tensors: list[torch.Tensor], **metadata: Any) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(
        tensors=[serialize_torch_tensor(t.detach()) for t in tensors],
        metadata=MSGPackSerializer.dumps(metadata),
    )


def response(tensors: list[torch.Tensor], **metadata: Any) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(
        tensors=[serialize_torch_tensor(t.detach()) for t in tensors],
        metadata=MSGPackSerializer.dumps(metadata),
    )


def error_response(message: str, kind: str) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps({"error": message, "kind": kind}))


def tensors_of(message) -> list[torch.Tensor]:
    return [deserialize_torch_tensor(t) for t in message.tensors]


def metadata_of(message, kind: str = BAD_REQUEST) -> dict:
    """The message's metadata mapping; undecodable or non-mapping bytes raise :class:`RemoteError` of
    ``kind`` (the sender's fault: ``bad_request`` for a request, ``internal`` for a response)."""
    try:
        value = MSGPackSerializer.loads(message.metadata) if message.metadata else {}
    except Exception as e:  # noqa: BLE001 (untrusted bytes: any decoding error is the sender's)
        raise RemoteError(f"metadata: cannot decode ({e!r})", kind) from None
    if not isinstance(value, dict):
        raise RemoteError("metadata: expected a mapping", kind)
    return value


def unpack_response(message: runtime_pb2.ExpertResponse) -> list[torch.Tensor]:
    """The result tensors, or the server's error raised as :class:`RemoteError`. A malformed response
    is the server's fault (``internal``: the client fails over), never the caller's."""
    meta = metadata_of(message, kind=INTERNAL)
    if "error" in meta:
        raise RemoteError(str(meta["error"]), str(meta.get("kind", INTERNAL)))
    try:
        return tensors_of(message)
    except Exception as e:  # noqa: BLE001 (undecodable tensors from a faulty or hostile server)
        raise RemoteError(f"response tensors: cannot decode ({e!r})", INTERNAL) from None
