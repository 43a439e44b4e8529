"""Finding the run to join: from the coordinator (gRPC ``Join``) or from its signed DHT announcement."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from hivemind.dht import DHT

from potluck.protocols.coordinator_access import CoordinatorAccess
from potluck.protocols.records import read_announcements
from potluck.protocols.runspec import RunSpec, parse_run_spec


class DiscoveryError(RuntimeError):
    """The run could not be found or is not trusted; the message says what to check."""


@dataclass(frozen=True)
class JoinedRun:
    spec: RunSpec
    initial_peers: list[str]
    coordinator_key: bytes


def join_via_coordinator(
    address: str, run_id: str | None, timeout: float = 30.0, access: CoordinatorAccess | None = None
) -> JoinedRun:
    """Ask the coordinator for the run; ``access`` carries the certificate to trust if it runs TLS."""
    from potluck.protocols.coordinator_client import CoordinatorClient, CoordinatorError

    try:
        with CoordinatorClient(address, timeout=timeout, access=access) as client:
            joined = client.join(run_id)
    except CoordinatorError as e:
        raise DiscoveryError(f"coordinator {address}: {e}") from None
    if joined.run.status != "active":
        raise DiscoveryError(f"run {joined.run.run_id!r} at {address} is {joined.run.status}, not active")
    spec = parse_run_spec(joined.run.spec, source=f"run {joined.run.run_id!r} from {address}")
    return JoinedRun(spec, list(joined.initial_peers), joined.coordinator_public_key)


def read_trusted_key(value: str) -> bytes:
    """``--coordinator-key``: the ``[owner:ssh-rsa ...]`` text itself, or a file that holds it."""
    path = Path(value)
    text = path.read_text().strip() if path.is_file() else value.strip()
    if not (text.startswith("[owner:") and text.endswith("]")):
        raise DiscoveryError(
            f"--coordinator-key must be '[owner:ssh-rsa ...]' or a file holding it, got {value!r}"
        )
    return text.encode()


def find_run_in_dht(dht: DHT, run_id: str, trusted_key: bytes, timeout: float = 60.0) -> RunSpec:
    """Wait for the coordinator's signed announcement of ``run_id``; others' announcements are ignored."""
    deadline = time.monotonic() + timeout
    while True:
        found = read_announcements(dht, trusted_key)
        if run_id in found.records:
            announcement = found.records[run_id]
            if announcement.status != "active":
                raise DiscoveryError(f"run {run_id!r} is {announcement.status}, not active")
            return parse_run_spec(
                json.loads(announcement.spec_json), source=f"the DHT announcement of {run_id!r}"
            )
        if time.monotonic() > deadline:
            ignored = sum(found.skipped.values())
            raise DiscoveryError(
                f"no announcement of run {run_id!r} signed by the trusted coordinator key within {timeout:.0f}s"
                + (f" ({ignored} untrusted or malformed announcement(s) ignored)" if ignored else "")
            )
        time.sleep(1.0)
