"""Following the run's status (``active``, ``paused``, ``finished``) as its coordinator announces it.

The coordinator signs one announcement per run in the DHT (``protocols/records.py``) and re-stores it
whenever an operator changes the run's status (``potluck run status RUN paused``), and every collection
(``--collect-interval``) while the run is active or paused. A peer reads it every :data:`POLL_SECONDS`:
the coordinator is never asked directly, so a peer that cannot reach it (or its announcement, which
expires a minute after it stops) keeps the status it knew last: a running swarm trains on without its
coordinator, and a paused one stays paused until its coordinator says otherwise.

Anyone may store an announcement of the same run id under a key of their own: it is not the run's status.
Such announcements are ignored, and each one (a key and its ``announced_at``) is counted once
(``on_forged``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from hivemind.dht import DHT

from potluck.protocols.records import owner_of, read_run_status
from potluck.runtime.periodic import Periodic

logger = logging.getLogger(__name__)

POLL_SECONDS = 2.0
"""How often a peer reads its run's status from the DHT: a pause, resume or finish reaches it within
this (plus the DHT's own delay, well under a second on a healthy swarm)."""
MAX_FORGED_REMEMBERED = 1024
"""Forged announcements remembered so that each is counted once; past this, the oldest are forgotten."""


def key_fingerprint(key_tag: bytes) -> str:
    """A short, stable name for a public key (its ``[owner:...]`` tag is ~400 bytes)."""
    return hashlib.sha256(key_tag).hexdigest()[:16]


class RunStatusWatch:
    """Reads the run's status in the background; :attr:`status` is the latest known (``active`` until a
    signed announcement says otherwise). From the watch's thread, ``on_change(status)`` is called when it
    changes, and ``on_forged(fingerprint, status)`` once for every announcement of this run under
    another key."""

    def __init__(
        self,
        dht: DHT,
        run_id: str,
        trusted_key: bytes,
        interval: float = POLL_SECONDS,
        on_change: Callable[[str], None] | None = None,
        on_forged: Callable[[str, str], None] | None = None,
    ):
        self.dht, self.run_id, self.trusted_key = dht, run_id, trusted_key
        self.status = "active"
        self.on_change = on_change or (lambda status: None)
        self.on_forged = on_forged or (lambda fingerprint, status: None)
        self._announced_at = 0.0
        self._forged_seen: dict[tuple[bytes, float], None] = {}
        # a failed read (DHT hiccup) is logged; the status stays what it was until a read succeeds
        self._periodic = Periodic(self.poll, interval, "potluck-run-status", immediately=True)

    def start(self) -> RunStatusWatch:
        self._periodic.start()
        return self

    def stop(self) -> None:
        self._periodic.stop(grace=1)

    def poll(self) -> None:
        found = read_run_status(self.dht, self.run_id, self.trusted_key)
        for subkey, forged in found.forged.items():
            self._count_forged(subkey, forged.announced_at, forged.status)
        announcement = found.announcement
        # an older announcement than one already seen (a node that lost the newer) says nothing new
        if announcement is None or announcement.announced_at < self._announced_at:
            return
        self._announced_at = announcement.announced_at
        if announcement.status != self.status:
            self.status = announcement.status
            self.on_change(announcement.status)

    def _count_forged(self, subkey: bytes, announced_at: float, status: str) -> None:
        if (subkey, announced_at) in self._forged_seen:
            return
        self._forged_seen[(subkey, announced_at)] = None
        if len(self._forged_seen) > MAX_FORGED_REMEMBERED:
            del self._forged_seen[next(iter(self._forged_seen))]
        key = key_fingerprint(owner_of(subkey) or subkey)
        logger.warning(
            f"ignored an announcement of run {self.run_id!r} as {status} by key {key}, not its coordinator's"
        )
        self.on_forged(key, status)
