"""Choose a chain of shard servers covering a range of blocks: the fastest by announced throughput and
measured latency, skipping servers banned after a failure.

A route is a list of :class:`Hop` s; a hop may use only part of a server's span, so a route can mix
servers with overlapping spans. The cost of a hop is the server's latency plus the time its blocks
take at its announced throughput (for ``tokens_hint`` tokens); the route minimises the sum (Dijkstra
over block boundaries, as Petals does).
"""

from __future__ import annotations

import collections
import heapq
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from hivemind.dht import DHT

from potluck.protocols.shards import ShardAnnouncement, read_shards

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.start}:{self.end}@{self.peer_id[-8:]}"


class ForgedAnnouncement(RuntimeError):
    """The server behind an announced peer id serves something other than what the record says."""


class NoRouteError(RuntimeError):
    """No reachable, unbanned server serves some block: start a server for it or wait for one."""


class Router:
    """Tune ``ban_seconds`` (how long a failed server is avoided) up on flaky swarms and
    ``refresh_seconds`` (how stale the list of servers may be) down when servers come and go often."""

    def __init__(
        self,
        dht: DHT,
        run_id: str,
        ban_seconds: float = 60.0,
        refresh_seconds: float = 5.0,
        probe: Callable[[str, ShardAnnouncement], float] | None = None,
        default_latency: float = 0.05,
        tokens_hint: int = 256,
        spread: float = 0.0,
        reprobe_seconds: float = 30.0,
    ):
        self.dht, self.run_id = dht, run_id
        self.ban_seconds, self.refresh_seconds = ban_seconds, refresh_seconds
        self.probe = probe
        """Measures a server's round trip in seconds (raises if it is unreachable): its latency."""
        self.default_latency, self.tokens_hint = default_latency, tokens_hint
        self.spread = spread
        """Each hop's cost is multiplied by a random factor in [1, 1 + spread]: > 0 spreads clients over
        replicas of similar speed (load balancing), 0 always takes the cheapest."""
        self.reprobe_seconds = reprobe_seconds
        """A server whose latency was last measured this long ago is probed again before a route is chosen: its
        calls measure only the servers a route takes, and one slow probe (a busy moment on a loaded machine) left
        a replica unused for the client's whole life (its cost stayed above the others' even with ``spread``)."""
        self.servers: dict[str, ShardAnnouncement] = {}
        self.latency: dict[str, float] = {}
        self.measured_at: dict[str, float] = {}
        self.forged: set[tuple[str, int, int]] = set()
        """(peer id, start, end) claims the named server contradicted: ignored from now on."""
        self.skipped: collections.Counter[str] = collections.Counter()
        """Announcements the last refresh ignored, by reason (malformed, unsigned, version, forged)."""
        self.banned_until: dict[str, float] = {}
        self._refreshed_at = -float("inf")

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._refreshed_at < self.refresh_seconds:
            return
        read = read_shards(self.dht, self.run_id)
        self.skipped = collections.Counter(read.skipped, forged=len(self.forged))
        self.servers = {
            a.peer_id: a
            for a in read.records.values()
            if a.state == "online" and (a.peer_id, a.start, a.end) not in self.forged
        }
        self._refreshed_at = time.monotonic()

    def ban(self, peer_id: str) -> None:
        self.banned_until[peer_id] = time.monotonic() + self.ban_seconds
        logger.info(f"banned shard server {peer_id} for {self.ban_seconds:.0f}s")

    def unban(self, peer_id: str) -> None:
        self.banned_until.pop(peer_id, None)

    def is_banned(self, peer_id: str) -> bool:
        return self.banned_until.get(peer_id, 0.0) > time.monotonic()

    def observe_latency(self, peer_id: str, seconds: float, alpha: float = 0.2) -> None:
        previous = self.latency.get(peer_id)
        self.latency[peer_id] = seconds if previous is None else (1 - alpha) * previous + alpha * seconds
        self.measured_at[peer_id] = time.monotonic()

    def address_of(self, peer_id: str) -> list[str]:
        announcement = self.servers.get(peer_id)
        return list(announcement.addresses) if announcement else []

    def _usable(self) -> list[ShardAnnouncement]:
        usable = []
        for peer_id, announcement in self.servers.items():
            if self.is_banned(peer_id):
                continue
            # never measured, or measured too long ago
            stale = time.monotonic() - self.measured_at.get(peer_id, -math.inf) > self.reprobe_seconds
            if stale and self.probe is not None:
                try:
                    # a fresh probe replaces a stale measure (alpha 1): it says how the server answers now
                    self.observe_latency(peer_id, self.probe(peer_id, announcement), alpha=1.0)
                except ForgedAnnouncement as e:
                    # a forged claim must not get the real server banned: drop the claim; the next
                    # forced refresh then finds the server's genuine announcement
                    logger.warning(f"ignoring a shard announcement: {e}")
                    self.forged.add((peer_id, announcement.start, announcement.end))
                    self.skipped["forged"] = len(self.forged)
                    continue
                except Exception as e:  # noqa: BLE001 (an unreachable server is banned, not fatal)
                    logger.info(f"shard server {peer_id} unreachable: {e!r}")
                    self.ban(peer_id)
                    continue
            usable.append(announcement)
        return usable

    def route(self, start: int, end: int) -> list[Hop]:
        """The cheapest chain of hops covering blocks ``start:end``; refreshes once before giving up."""
        self.refresh()
        hops = self._shortest(start, end, self._usable())
        if hops is None:
            self.refresh(force=True)
            hops = self._shortest(start, end, self._usable())
        if hops is None:
            raise NoRouteError(
                f"blocks {start}:{end} of run {self.run_id!r}: no reachable server covers block "
                f"{self._first_gap(start, end)} ({len(self.servers)} servers announced, "
                f"{sum(self.is_banned(p) for p in self.servers)} banned)"
            )
        return hops

    def _first_gap(self, start: int, end: int) -> int:
        covered = {
            b for a in self.servers.values() if not self.is_banned(a.peer_id) for b in range(a.start, a.end)
        }
        return next((b for b in range(start, end) if b not in covered), start)

    def _shortest(self, start: int, end: int, servers: list[ShardAnnouncement]) -> list[Hop] | None:
        best: dict[int, float] = {start: 0.0}
        previous: dict[int, Hop] = {}
        queue = [(0.0, start)]
        while queue:
            cost, block = heapq.heappop(queue)
            if block == end:
                break
            if cost > best.get(block, float("inf")):
                continue
            for server in servers:
                if not server.start <= block < server.end:
                    continue
                stop = min(server.end, end)
                compute = (stop - block) * self.tokens_hint / max(server.throughput, 1e-6)
                hop_cost = self.latency.get(server.peer_id, self.default_latency) + compute
                total = cost + hop_cost * (1 + random.random() * self.spread)
                if total < best.get(stop, float("inf")):
                    best[stop] = total
                    previous[stop] = Hop(server.peer_id, block, stop)
                    heapq.heappush(queue, (total, stop))
        if end not in previous and start != end:
            return None
        hops, block = [], end
        while block != start:
            hops.append(previous[block])
            block = previous[block].start
        return hops[::-1]
