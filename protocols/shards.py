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

import math
from typing import Dict  # noqa: UP035 (pydantic v1 schemas for hivemind want typing.Dict)

from hivemind.dht import DHT
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils.crypto import RSAPrivateKey
from pydantic.v1 import (
    BaseModel,
    StrictFloat,
    conint,
    conlist,
    constr,
    root_validator,
    validator,
)

from potluck.hivemind_ext.keys import peer_id_of_owner
from potluck.protocols.records import ReadResult, read_owned, record_validators

SHARD_PROTOCOL_VERSION = "potluck-shard/2"
"""Servers and clients with another version do not talk: the client skips such servers. 2: requests may carry
``padding`` (a server of version 1 would ignore it and answer wrongly)."""
MAX_BLOCKS = 4096
MAX_PREFIX_TOKENS = 256
"""A client's prefix (prefix tuning) a server takes by default, per request."""


def shards_key(run_id: str) -> str:
    return f"{run_id}_shards"


class ShardAnnouncement(BaseModel):
    """What a block-span server tells clients (and other servers choosing a span) about itself."""

    run_id: constr(regex=r"^[a-z0-9][a-z0-9_-]{0,62}$", strict=True)
    peer_id: constr(min_length=1, max_length=128, strict=True)
    """The libp2p peer id to call (base58)."""
    start: conint(ge=0, le=MAX_BLOCKS, strict=True)
    end: conint(ge=1, le=MAX_BLOCKS, strict=True)
    """The span is blocks ``start … end-1`` of the model (Python slice convention)."""
    throughput: StrictFloat
    """Tokens per second this server pushes through one block (measured at start-up)."""
    state: constr(regex=r"^(joining|online|offline)$", strict=True)
    version: constr(max_length=64, strict=True)
    announced_at: StrictFloat
    addresses: conlist(constr(max_length=256, strict=True), max_items=8) = []
    """The server's multiaddrs, so a client that never met it in the DHT can dial it."""

    class Config:
        extra = "forbid"

    @validator("throughput", "announced_at")
    def _finite(cls, value):
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be finite and non-negative")
        return value

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
    """Potluck's validators (``records.record_validators``) plus the shard schema of ``run_id``:
    pass them to a shard peer's DHT at creation so they come first."""
    validators = record_validators(private_key, (run_id,))
    schema = next(v for v in validators if isinstance(v, SchemaValidator))  # the counting one
    schema.merge_with(shard_schema_validator(run_id))
    return validators


def announce_shard(dht: DHT, key_tag: bytes, announcement: ShardAnnouncement, ttl: float, wait: bool = True):
    from hivemind.utils.timed_storage import get_dht_time

    return dht.store(
        shards_key(announcement.run_id),
        subkey=key_tag,
        value=announcement.dict(),
        expiration_time=get_dht_time() + ttl,
        return_future=not wait,
    )


def read_shards(dht: DHT, run_id: str, version: str = SHARD_PROTOCOL_VERSION) -> ReadResult:
    """Shard announcements of ``run_id`` by owner key: re-validated, of our protocol ``version`` only, and naming
    the peer id of the key that signed them (a server signs with its identity's key, ``hivemind_ext/keys.py``):
    one announcing another server's id would send clients there, and get it banned for failing them."""

    def check(owner: bytes, announcement: ShardAnnouncement) -> str | None:
        if announcement.run_id != run_id:
            return "malformed"  # filed under another run's key
        if announcement.version != version:
            return "version"
        return "peer_id_mismatch" if peer_id_of_owner(owner) != announcement.peer_id else None

    return read_owned(dht, shards_key(run_id), ShardAnnouncement, check)
