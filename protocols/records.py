"""Schemas, keys and trust rules for every DHT record Potluck writes.

Key scheme (every key that belongs to a run starts with its run id):

| key | subkey | value | signed by |
| --- | --- | --- | --- |
| ``potluck_runs`` | ``<run_id>`` + the coordinator's ``[owner:<public key>]`` | :class:`RunAnnouncement` | the coordinator |
| ``<run_id>_reports`` | the peer's ``[owner:<public key>]`` | :class:`PeerReport` | that peer |
| ``<run_id>_access`` | the peer's ``[owner:<public key>]`` | an access token (``protocols/access.py``) | that peer |

hivemind's own keys (``<run_id>_progress``, ``<run_id>_grad_averager…``, ``<run_id>_state_averager…``)
are listed in docs/architecture.md.

Trust model: hivemind's ``RSASignatureValidator`` makes every DHT node refuse a record whose key or
subkey names an owner key unless the record is signed by that key, so no peer can write another's
report, and nobody can overwrite the coordinator's announcement. Anyone *can* announce a run under
their own key: readers accept announcements only from the coordinator key they trust. Records that
fail a schema, exceed :data:`MAX_RECORD_BYTES` or carry a bad signature are rejected by every node
and counted (:func:`rejection_counts`); readers re-validate what they read and count what they skip.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict  # noqa: UP035 (pydantic v1 schemas for hivemind want typing.Dict)

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey
from pydantic.v1 import BaseModel, StrictFloat, ValidationError, conint, conlist, constr, validator

from potluck.hivemind_ext.access import access_in_use
from potluck.hivemind_ext.keys import load_private_key, peer_id_of_owner
from potluck.hivemind_ext.p2p import node_validators
from potluck.protocols.access import MAX_TOKEN_CHARS

RUNS_KEY = "potluck_runs"
MAX_RECORD_BYTES = 64 * 1024
"""Larger values are refused by every node: a run spec or a report is a few KiB at most."""
_OWNER = re.compile(rb"\[owner:(.+?)\]")


def reports_key(run_id: str) -> str:
    return f"{run_id}_reports"


class RunAnnouncement(BaseModel):
    run_id: constr(regex=r"^[a-z0-9][a-z0-9_-]{0,62}$", strict=True)
    spec_json: constr(max_length=MAX_RECORD_BYTES // 2, strict=True)
    status: constr(regex=r"^(active|paused|finished)$", strict=True)
    announced_at: StrictFloat

    class Config:
        extra = "forbid"


class PeerReport(BaseModel):
    """What a peer tells the swarm (and the coordinator) about itself, every few seconds."""

    peer_id: constr(max_length=128, strict=True)
    global_step: conint(ge=0, strict=True)
    loss: StrictFloat | None
    samples_per_second: StrictFloat
    samples_total: conint(ge=0, strict=True)
    averaging_succeeded: conint(ge=0, strict=True)
    averaging_failed: conint(ge=0, strict=True)
    reported_at: StrictFloat
    addresses: conlist(constr(max_length=256, strict=True), max_items=8) = []
    """The peer's DHT multiaddrs (empty in client mode): a restarted coordinator rejoins through them."""
    bytes_sent: conint(ge=0, strict=True) = 0
    """Payload bytes this peer sent in averaging rounds so far (``potluck_averaging_sent_bytes_total``)."""
    bytes_received: conint(ge=0, strict=True) = 0
    compute_utilisation: StrictFloat | None = None
    """Time computing / wall time since the peer's first step (``potluck_compute_utilisation``)."""

    class Config:
        extra = "forbid"

    @validator("loss", "samples_per_second", "compute_utilisation")
    def _finite(cls, value):
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value


class _RunsSchema(BaseModel):
    potluck_runs: Dict[BytesWithPublicKey, RunAnnouncement]  # noqa: UP006


class _RunKeysSchema(BaseModel):
    """A run's own keys: ``<run_id>_reports`` and ``<run_id>_access`` (access tokens, ``protocols/access.py``)."""

    reports: Dict[BytesWithPublicKey, PeerReport]  # noqa: UP006
    access: Dict[BytesWithPublicKey, constr(max_length=MAX_TOKEN_CHARS, strict=True)]  # noqa: UP006


# -- validators that count what they reject (they run inside the DHT process) ---------------------
class CountingSignatureValidator(RSASignatureValidator):
    def __init__(self, private_key: RSAPrivateKey | None = None):
        super().__init__(private_key)
        self.rejected: Counter = Counter()

    def validate(self, record: DHTRecord) -> bool:
        ok = super().validate(record)
        if not ok:
            self.rejected["signature"] += 1
        return ok


class CountingSchemaValidator(SchemaValidator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rejected: Counter = Counter()

    def validate(self, record: DHTRecord) -> bool:
        ok = super().validate(record)
        if not ok:
            self.rejected["schema"] += 1
        return ok


class RecordSizeValidator(RecordValidatorBase):
    def __init__(self, max_bytes: int = MAX_RECORD_BYTES):
        self.max_bytes = max_bytes
        self.rejected: Counter = Counter()

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) > self.max_bytes:
            self.rejected["oversized"] += 1
            return False
        return True


def record_validators(private_key: RSAPrivateKey | None = None, run_ids: tuple[str, ...] = ()) -> list:
    """Validators for a DHT node: pass them to ``DHT(record_validators=...)`` so they come first
    (hivemind keeps the first signature validator and merges later schema validators into ours)."""
    schema = CountingSchemaValidator(_RunsSchema, allow_extra_keys=True)
    for run_id in run_ids:
        schema.merge_with(SchemaValidator(_RunKeysSchema, allow_extra_keys=True, prefix=run_id))
    return [CountingSignatureValidator(private_key), schema, RecordSizeValidator()]


def run_schema_validator(run_id: str) -> SchemaValidator:
    """Add to a running DHT (``dht.add_validators``) when it starts serving another run."""
    return SchemaValidator(_RunKeysSchema, allow_extra_keys=True, prefix=run_id)


async def _rejections_in_node(_dht, node) -> dict[str, int]:
    total: Counter = Counter()
    for v in node_validators(node):
        total.update(getattr(v, "rejected", {}))
    return dict(total)


def rejection_counts(dht: DHT) -> dict[str, int]:
    """Records this node refused to store, by reason (``signature``, ``schema``, ``oversized``)."""
    return dht.run_coroutine(_rejections_in_node)


# -- keys ------------------------------------------------------------------------------------------
def owner_of(subkey: bytes) -> bytes | None:
    """The ``[owner:...]`` part of a subkey (a serialized RSA public key), or None."""
    match = _OWNER.search(subkey) if isinstance(subkey, bytes) else None
    return match.group(0) if match else None


def load_or_create_key(path: Path) -> RSAPrivateKey:
    """The coordinator's signing key, kept in ``path`` (DER, mode 0600) across restarts."""
    if path.exists():
        return load_private_key(path.read_bytes())
    fresh = RSAPrivateKey()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(fresh.to_bytes())
    return fresh


def public_key_tag(key: RSAPrivateKey) -> bytes:
    """hivemind's ``[owner:...]`` form of the key's public half: what peers are told to trust."""
    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", key.get_public_key().to_bytes())


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class ReadResult:
    """Records that passed the reader's checks, and counts of those skipped, by reason."""

    records: dict = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    untrusted: dict = field(default_factory=dict)
    """Announcements skipped as ``untrusted_announcement``, as stored: their subkey -> value (a dict
    every node checked against :class:`RunAnnouncement`)."""


def read_announcements(dht: DHT, trusted_key: bytes) -> ReadResult:
    """Run announcements signed by ``trusted_key`` (``public_key_tag`` form), by run id."""
    result = ReadResult()
    found = dht.get(RUNS_KEY, latest=True)
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    for subkey, item in entries.items():
        if owner_of(subkey) != trusted_key:
            result.skipped["untrusted_announcement"] += 1
            result.untrusted[subkey] = item.value
            continue
        try:
            announcement = RunAnnouncement.parse_obj(item.value)
        except (ValidationError, TypeError):
            result.skipped["malformed"] += 1
            continue
        if subkey != announcement.run_id.encode() + trusted_key:
            result.skipped["malformed"] += 1  # an announcement filed under another run's subkey
            continue
        result.records[announcement.run_id] = announcement
    return result


@dataclass(frozen=True)
class RunStatusRead:
    """One look at a run's status in the DHT (``read_run_status``)."""

    announcement: RunAnnouncement | None
    """The run's announcement signed by the trusted key; None when there is none now (expired: the
    coordinator is down or no longer announces the run)."""
    forged: dict[bytes, RunAnnouncement]
    """Announcements of the same run id under other keys, by subkey: anyone may store those, and they
    are not the run's status."""


def read_run_status(dht: DHT, run_id: str, trusted_key: bytes) -> RunStatusRead:
    """The status of ``run_id`` as its coordinator (``trusted_key``) announces it, and the announcements
    of that run under other keys, which a peer ignores (and counts)."""
    found = read_announcements(dht, trusted_key)
    forged = {}
    for subkey, value in found.untrusted.items():
        try:
            announcement = RunAnnouncement.parse_obj(value)
        except (ValidationError, TypeError):
            continue  # malformed: every node refuses those already
        if announcement.run_id == run_id:
            forged[subkey] = announcement
    return RunStatusRead(found.records.get(run_id), forged)


class ServerAnnouncement(BaseModel):
    """What every shard server tells others about itself (a block-span server's ``shards.ShardAnnouncement`` and
    an expert server's ``experts.ExpertAnnouncement`` add what they serve)."""

    run_id: constr(regex=r"^[a-z0-9][a-z0-9_-]{0,62}$", strict=True)
    peer_id: constr(min_length=1, max_length=128, strict=True)
    """The libp2p peer id to call (base58)."""
    throughput: StrictFloat
    """Tokens per second this server pushes through one block or one expert (measured at start-up)."""
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


def store_owned(dht: DHT, key: str, key_tag: bytes, record: BaseModel, ttl: float, wait: bool = True):
    """Store ``record`` under ``key`` and this peer's owner subkey ``key_tag``, for ``ttl`` seconds (a server's
    announcement: shard spans, experts)."""
    from hivemind.utils.timed_storage import get_dht_time

    return dht.store(
        key, subkey=key_tag, value=record.dict(), expiration_time=get_dht_time() + ttl, return_future=not wait
    )


def read_servers(dht: DHT, key: str, schema: type[BaseModel], run_id: str, version: str) -> ReadResult:
    """Servers' announcements under ``key`` by owner key (``schema`` has ``run_id``, ``version``, ``peer_id``):
    re-validated, of protocol ``version`` only, and naming the peer id of the key that signed them (a server signs
    with its identity's key, ``hivemind_ext/keys.py``): one announcing another server's id would send clients
    there, and get it banned for failing them."""

    def check(owner: bytes, announcement) -> str | None:
        if announcement.run_id != run_id:
            return "malformed"  # filed under another run's key
        if announcement.version != version:
            return "version"
        if peer_id_of_owner(owner) != announcement.peer_id:
            return "peer_id_mismatch"
        if (access := access_in_use()) is not None and not access.admits(announcement.peer_id):
            access.refuse("record", announcement.peer_id, once=True)
            return "no_access_token"  # a private run's server without a token: nobody calls it
        return None

    return read_owned(dht, key, schema, check)


def read_owned(dht: DHT, key: str, schema: type[BaseModel], check=None) -> ReadResult:
    """Entries under ``key`` whose subkey carries an owner's public key, re-validated with ``schema``, by
    owner. ``check(owner, record)`` may name a reason to skip a valid record (counted under it), or return
    None."""
    result = ReadResult()
    found = dht.get(key, latest=True)
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    for subkey, item in entries.items():
        owner = owner_of(subkey)
        try:
            record = schema.parse_obj(item.value)
        except (ValidationError, TypeError):
            result.skipped["malformed"] += 1
            continue
        reason = "unsigned" if owner is None else check(owner, record) if check is not None else None
        if reason is not None:
            result.skipped[reason] += 1
        else:
            result.records[owner] = record
    return result


def read_reports(dht: DHT, run_id: str) -> ReadResult:
    """Peer reports of a run, by the owner key of their subkey (schema-checked; :class:`ReportGate` for the rest)."""
    return read_owned(dht, reports_key(run_id), PeerReport)


MAX_CLOCK_SKEW = 120.0
"""Seconds a report's ``reported_at`` may lie ahead of the reader's clock (volunteers' clocks drift)."""


REPORT_REFUSALS = ("peer_id_mismatch", "replayed", "from_the_future")
"""Why :class:`ReportGate` refuses a report (``potluck_dht_records_rejected_total{reason=…}``)."""


class ReportGate:
    """What a reader of one run's peer reports checks beyond the schema and the DHT's signatures:

    - ``peer_id_mismatch``: the report names a peer id other than the one of the key that signed it (a peer's
      records are signed with its identity's key, ``hivemind_ext/keys.py``): one peer passing itself off as
      another, or a peer that does not sign with its identity (a foreign or outdated client);
    - ``replayed``: older than a report already admitted from the same key (a signed record stored again);
    - ``from_the_future``: ``reported_at`` more than :data:`MAX_CLOCK_SKEW` ahead of the reader's clock;
    - ``no_access_token``: a private run's report from a peer that holds no valid token (``admits``, given:
      ``hivemind_ext.access.AccessList.admits``).

    A record refused is refused at every read, and counted once (``refused``), however often it is read."""

    MAX_REMEMBERED = 100_000

    def __init__(self, admits: Callable[[str], bool] | None = None) -> None:
        self.admits = admits
        self.refused: Counter = Counter()
        self._newest: dict[bytes, float] = {}
        self._seen: set[tuple[bytes, float, str]] = set()

    def admit(self, owner: bytes, report: PeerReport, now: float) -> bool:
        reason = None
        if peer_id_of_owner(owner) != report.peer_id:
            reason = "peer_id_mismatch"
        elif self.admits is not None and not self.admits(report.peer_id):
            reason = "no_access_token"
        elif report.reported_at > now + MAX_CLOCK_SKEW:
            reason = "from_the_future"
        elif report.reported_at < self._newest.get(owner, -math.inf):
            reason = "replayed"
        if reason is None:
            self._newest[owner] = report.reported_at
            return True
        if (owner, report.reported_at, reason) not in self._seen:
            if len(self._seen) >= self.MAX_REMEMBERED:
                self._seen.clear()  # a flood of forgeries: some may then be counted twice, none admitted
            self._seen.add((owner, report.reported_at, reason))
            self.refused[reason] += 1
        return False


def announce_run(dht: DHT, key_tag: bytes, announcement: RunAnnouncement, ttl: float) -> bool:
    from hivemind.utils.timed_storage import get_dht_time

    return dht.store(
        RUNS_KEY,
        subkey=announcement.run_id.encode() + key_tag,
        value=announcement.dict(),
        expiration_time=get_dht_time() + ttl,
    )


def publish_report(dht: DHT, key_tag: bytes, run_id: str, report: PeerReport, ttl: float, wait: bool = False):
    from hivemind.utils.timed_storage import get_dht_time

    return dht.store(
        reports_key(run_id),
        subkey=key_tag,
        value=report.dict(),
        expiration_time=get_dht_time() + ttl,
        return_future=not wait,
    )
