"""State donors: which peer serves a newcomer the swarm's state, and how many at once.

hivemind sends every newcomer to the donor that declared the newest state (ties broken at random), so
peers that join together all download from one peer while the others idle (hivemind #169); that
donor's uplink then serves them one after another, and its own training waits on the copies. A donor
here serves at most ``donor_slots`` downloads at a time and turns further newcomers away with an
empty answer, which hivemind's newcomer takes as "try the next donor" (as it does for a peer that
does not share its state). A newcomer that every donor turned away tries again a little later.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import (  # noqa: UP035 (hivemind reads the stream type from typing's alias only)
    AsyncIterator,
    TypeVar,
)

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

UPSTREAM = {
    "hivemind.averaging.averager.DecentralizedAverager.rpc_download_state": "fd2f6f19e7d247af",  # overridden to limit concurrent downloads
    "hivemind.averaging.averager.DecentralizedAverager._load_state_from_peers": "fe7b419d01ced5fe",  # takes an empty stream as 'next donor'
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""

logger = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_RETRY_SECONDS = (0.5, 2.0)
"""A turned-away newcomer waits a random time in this range before trying again: newcomers that arrived
together then come back spread out."""


class LimitedDonor(DecentralizedAverager):
    """An averager that serves at most ``donor_slots`` state downloads at once (see the module docstring).

    The count lives in the averager's own process, where hivemind serves downloads on one event loop."""

    def __init__(self, *args, donor_slots: int = 2, **kwargs):
        self.donor_slots = donor_slots
        self._serving = 0
        super().__init__(*args, **kwargs)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if self._serving >= self.donor_slots:
            return  # an empty stream: hivemind's newcomer moves on to its next donor
        self._serving += 1
        try:
            async for message in super().rpc_download_state(request, context):
                yield message
        finally:
            self._serving -= 1


def other_donors(dht: DHT, averager: DecentralizedAverager) -> int:
    """How many peers besides this one currently offer ``averager``'s state (hivemind's donor records)."""
    found = dht.get(f"{averager.prefix}.all_averagers", latest=True)
    records = found.value if found is not None and isinstance(found.value, dict) else {}
    me = dht.peer_id.to_bytes()
    return sum(
        1
        for peer, record in records.items()
        if peer != me and isinstance(getattr(record, "value", None), (int, float))
    )


def wait_before_retrying() -> None:
    time.sleep(random.uniform(*BUSY_RETRY_SECONDS))


def download_with_retries(
    attempt: Callable[[], T | None],
    *,
    attempts: int,
    donors_left: Callable[[], int],
    what: str,
    give_up_without_donors: bool,
) -> T | None:
    """Run ``attempt`` (one state download; None: nothing usable arrived) at most ``attempts`` times.

    hivemind's newcomer retries forever, so a swarm whose only donor died would hang it. An attempt that
    raises (a donor died or timed out) is logged and the next one runs at once; one that got nothing
    waits a random pause (:func:`wait_before_retrying`) while ``donors_left()`` says other peers offer
    the state, since they were busy serving other newcomers. With no donor left it gives up when
    ``give_up_without_donors``, else tries again at once (DiLoCo: its donors' records may not have
    reached this peer yet). Raise ``attempts`` (``averaging.load_state_attempts``) if joiners give up
    while donors are merely busy."""
    for number in range(1, attempts + 1):
        try:
            result = attempt()
        except Exception as e:  # a donor that died or timed out: try again, a bounded number of times
            logger.warning(f"{what} attempt {number}/{attempts} failed: {e!r}")
            continue
        if result is not None:
            return result
        if number == attempts:
            break
        if donors_left():
            logger.info(f"{what}: every donor was busy or failed (attempt {number}); trying again")
            wait_before_retrying()
        elif give_up_without_donors:
            break
    return None
