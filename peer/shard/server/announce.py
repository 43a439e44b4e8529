"""A shard server's announcement in the DHT (a block span's, or experts'), refreshed in the background; and the
choice of span for a server started without ``--blocks``: the blocks the swarm serves worst."""

from __future__ import annotations

import logging
import threading
import time

from hivemind.dht import DHT

from potluck.protocols.shards import SHARD_PROTOCOL_VERSION, ShardAnnouncement, announce_shard

logger = logging.getLogger(__name__)


def coverage(announcements: list[ShardAnnouncement], num_blocks: int) -> list[tuple[int, float]]:
    """Per block: how many servers (online or joining) serve it, and their announced throughput."""
    servers, throughput = [0] * num_blocks, [0.0] * num_blocks
    for a in announcements:
        if a.state == "offline":
            continue
        for block in range(a.start, min(a.end, num_blocks)):
            servers[block] += 1
            throughput[block] += a.throughput
    return list(zip(servers, throughput, strict=True))


def choose_span(announcements: list[ShardAnnouncement], num_blocks: int, length: int) -> tuple[int, int]:
    """The ``length`` consecutive blocks whose worst-served block has the fewest servers, then the
    least throughput (ties: the least total throughput, then the first). Uncovered blocks come first, so servers started one after
    another cover the model before any block gets a replica. A server that is still loading
    (``joining``, throughput 0) counts as a server, so the next one does not pick the same span.

    NOTE: servers that start at the same instant may still pick the same span."""
    length = max(1, min(length, num_blocks))
    served = coverage(announcements, num_blocks)
    return min(
        ((s, s + length) for s in range(num_blocks - length + 1)),
        key=lambda span: (
            min(served[span[0] : span[1]]),
            sum(throughput for _, throughput in served[span[0] : span[1]]),
            span[0],
        ),
    )


class Announcer:
    """Re-announces a server every ``interval`` seconds with a TTL of a few intervals, so a server that dies
    silently disappears from routes within ``ttl_intervals × interval``. Subclasses say what is announced
    (:meth:`announcement`) and where (:meth:`store`): a block span, or experts (``expert_service.py``)."""

    def __init__(
        self, dht: DHT, key_tag: bytes, run_id: str, interval: float = 5.0, ttl_intervals: float = 3.0
    ):
        self.dht, self.key_tag, self.run_id = dht, key_tag, run_id
        self.interval, self.ttl = interval, interval * ttl_intervals
        self.addresses = [] if dht.client_mode else [str(a) for a in dht.get_visible_maddrs()][:8]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{type(self).__name__}", daemon=True)

    def announcement(self, state: str):
        raise NotImplementedError

    def store(self, record, ttl: float) -> bool:
        raise NotImplementedError

    def announce(self, state: str) -> bool:
        return bool(self.store(self.announcement(state), self.ttl))

    def start(self):
        self.announce("online")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.announce("online")
            except Exception as e:  # noqa: BLE001 (best effort: the next interval tries again)
                logger.warning(f"could not announce the server: {e!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)
        try:
            self.announce("offline")
        except Exception as e:  # noqa: BLE001 (leaving anyway; the record expires by itself)
            logger.warning(f"could not announce leaving: {e!r}")


class ShardAnnouncer(Announcer):
    """A block-span server's :class:`ShardAnnouncement`."""

    def __init__(
        self,
        dht: DHT,
        key_tag: bytes,
        run_id: str,
        span: tuple[int, int],
        throughput: float,
        interval: float = 5.0,
        ttl_intervals: float = 3.0,
    ):
        super().__init__(dht, key_tag, run_id, interval, ttl_intervals)
        self.span, self.throughput = span, throughput

    def announcement(self, state: str) -> ShardAnnouncement:
        return ShardAnnouncement(
            run_id=self.run_id,
            peer_id=str(self.dht.peer_id),
            start=self.span[0],
            end=self.span[1],
            throughput=float(self.throughput),
            state=state,
            version=SHARD_PROTOCOL_VERSION,
            announced_at=time.time(),
            addresses=self.addresses,
        )

    def store(self, record: ShardAnnouncement, ttl: float) -> bool:
        return announce_shard(self.dht, self.key_tag, record, ttl=ttl)
