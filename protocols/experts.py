"""DHT records of expert servers: which peer serves which experts of a run's mixture-of-experts layers.

| key | subkey | value | signed by |
| --- | --- | --- | --- |
| ``<run_id>_experts`` | the server's ``[owner:<public key>]`` | :class:`ExpertAnnouncement` | that server |

An expert is named by its uid ``<layer>.<expert>`` (``1.3``: expert 3 of the model's block 1). Trust is as for
block-span servers (``protocols/shards.py``): every DHT node refuses a record under an ``[owner:…]`` subkey that
its owner did not sign, or one off the strict schema; readers (``read_experts``) keep only records of our
protocol version whose peer id is the signer's. Throughput and load are self-asserted; the trainer bans a server
that fails a request.
"""

from __future__ import annotations

from typing import Dict  # noqa: UP035 (pydantic v1 schemas for hivemind want typing.Dict)

from hivemind.dht import DHT
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from pydantic.v1 import BaseModel, StrictFloat, conlist, constr, validator

from potluck.protocols.records import ReadResult, ServerAnnouncement, read_servers, store_owned

EXPERT_PROTOCOL_VERSION = "potluck-experts/5"
"""Servers and trainers of another version do not talk: the trainer skips such servers. /2: ``expert_state``
carries AdamW's statistics and answers averaging rounds; ``info`` each expert's steps. /3: announcements carry
the server's ``load``. /4: a round's ``expert_state`` is followed by the snapshot's weight in the round. /5: a
streamed answer ends with an empty message and the trainer hangs up (``peer/shard/streaming.py``)."""
MAX_EXPERTS_PER_SERVER = 4096
UID_PATTERN = r"^[0-9]{1,4}\.[0-9]{1,4}$"


def experts_key(run_id: str) -> str:
    return f"{run_id}_experts"


def expert_uid(layer: int, expert: int) -> str:
    return f"{layer}.{expert}"


def parse_uid(uid: str) -> tuple[int, int]:
    layer, expert = uid.split(".")
    return int(layer), int(expert)


class ExpertAnnouncement(ServerAnnouncement):
    """What an expert server tells trainers about itself (its ``throughput``: tokens per second through one
    expert)."""

    uids: conlist(constr(regex=UID_PATTERN, strict=True), min_items=1, max_items=MAX_EXPERTS_PER_SERVER)
    """The experts served, ``<layer>.<expert>`` each."""
    load: StrictFloat = 0.0
    """The share of the last announcement interval the server spent computing, 0 to 1
    (``server/batching.LoadMeter``): trainers route an expert's tokens away from a replica near 1."""

    @validator("load")
    def _share(cls, value):
        if not 0.0 <= value <= 1.0:  # NaN fails both
            raise ValueError("must be between 0 and 1")
        return value

    @validator("uids")
    def _distinct(cls, uids):
        if len(set(uids)) != len(uids):
            raise ValueError("an expert is listed twice")
        return uids


class _ExpertsSchema(BaseModel):
    experts: Dict[BytesWithPublicKey, ExpertAnnouncement]  # noqa: UP006


def expert_schema_validator(run_id: str) -> SchemaValidator:
    """The schema of ``run_id``'s expert records (``shards.shard_record_validators`` merges it in)."""
    return SchemaValidator(_ExpertsSchema, allow_extra_keys=True, prefix=run_id)


def announce_experts(
    dht: DHT, key_tag: bytes, announcement: ExpertAnnouncement, ttl: float, wait: bool = True
):
    return store_owned(dht, experts_key(announcement.run_id), key_tag, announcement, ttl, wait)


def read_experts(dht: DHT, run_id: str, version: str = EXPERT_PROTOCOL_VERSION) -> ReadResult:
    """Expert announcements of ``run_id`` by owner key (``records.read_servers``)."""
    return read_servers(dht, experts_key(run_id), ExpertAnnouncement, run_id, version)
