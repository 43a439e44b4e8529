"""DHT records of shard servers: which peer serves which span of a run's blocks, how fast, in what state.

| key | subkey | value | signed by |
| --- | --- | --- | --- |
| ``<run_id>_shards`` | the server's ``[owner:<public key>]`` | :class:`ShardAnnouncement` | that server |

Trust: as for peer reports (``protocols/records.py``), every DHT node refuses a record under an
``[owner:…]`` subkey that its owner did not sign, and one that does not match the strict schema, so a
peer can announce only its own span. What a server *claims* (throughput, its libp2p peer id) is
self-asserted; the client measures latency itself and bans a server that fails a request.
"""

from __future__ import annotations

from typing import Dict  # noqa: UP035 (pydantic v1 schemas for hivemind want typing.Dict)

from hivemind.dht import DHT
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils.crypto import RSAPrivateKey
from pydantic.v1 import (
    BaseModel,
    conint,
    root_validator,
)

from potluck.protocols.experts import expert_schema_validator
from potluck.protocols.records import (
    ReadResult,
    ServerAnnouncement,
    read_servers,
    record_validators,
    store_owned,
)

SHARD_PROTOCOL_VERSION = "potluck-shard/3"
"""Servers and clients with another version do not talk: the client skips such servers. 2: requests may carry
``padding`` (a server of version 1 would ignore it and answer wrongly). 3: a streamed answer ends with an empty
message and the client hangs up (``peer/shard/streaming.py``; a client of version 2 refused that message)."""
MAX_BLOCKS = 4096
MAX_PREFIX_TOKENS = 256
"""A client's prefix (prefix tuning) a server takes by default, per request."""


def shards_key(run_id: str) -> str:
    return f"{run_id}_shards"


class ShardAnnouncement(ServerAnnouncement):
    """What a block-span server tells clients (and other servers choosing a span) about itself."""

    start: conint(ge=0, le=MAX_BLOCKS, strict=True)
    end: conint(ge=1, le=MAX_BLOCKS, strict=True)
    """The span is blocks ``start … end-1`` of the model (Python slice convention)."""

    @root_validator(skip_on_failure=True)
    def _span(cls, values):
        if values["end"] <= values["start"]:
            raise ValueError(f"empty span {values['start']}:{values['end']} (end must exceed start)")
        return values


class _ShardsSchema(BaseModel):
    shards: Dict[BytesWithPublicKey, ShardAnnouncement]  # noqa: UP006


def shard_schema_validator(run_id: str) -> SchemaValidator:
    """Add to a running DHT (``dht.add_validators``) to enforce the schema of ``run_id``'s shard records."""
    return SchemaValidator(_ShardsSchema, allow_extra_keys=True, prefix=run_id)


def shard_record_validators(private_key: RSAPrivateKey | None, run_id: str) -> list:
    """Potluck's validators (``records.record_validators``) plus the schemas of ``run_id``'s shard records (block
    spans, and experts: ``protocols/experts.py``): pass them to a shard peer's DHT at creation so they come first."""
    validators = record_validators(private_key, (run_id,))
    schema = next(v for v in validators if isinstance(v, SchemaValidator))  # the counting one
    schema.merge_with(shard_schema_validator(run_id))
    schema.merge_with(expert_schema_validator(run_id))
    return validators


def announce_shard(dht: DHT, key_tag: bytes, announcement: ShardAnnouncement, ttl: float, wait: bool = True):
    return store_owned(dht, shards_key(announcement.run_id), key_tag, announcement, ttl, wait)


def read_shards(dht: DHT, run_id: str, version: str = SHARD_PROTOCOL_VERSION) -> ReadResult:
    """Shard announcements of ``run_id`` by owner key (``records.read_servers``: of our protocol ``version``, naming
    the peer id of the key that signed them)."""
    return read_servers(dht, shards_key(run_id), ShardAnnouncement, run_id, version)
