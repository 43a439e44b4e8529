"""A state download that is not what its donor sent, or that holds NaN, is never used: real averagers on a
loopback DHT, two donors that tamper with their own streams, one whose own state holds NaN, and one honest
donor of lower priority."""

from __future__ import annotations

import math
from typing import AsyncIterator  # noqa: UP035 (hivemind reads the stream type from typing's alias only)

import pytest
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

from potluck.hivemind_ext.ctrl_c import KeepsCtrlC
from potluck.hivemind_ext.dht import start_dht
from potluck.hivemind_ext.donors import CheckedDownloads, other_donors
from tests.helpers import wait_until


class _Donor(CheckedDownloads, KeepsCtrlC):
    """Serves its averaged tensors; ``tamper`` spoils the stream after the manifest was made."""

    def __init__(self, tensors, dht, *, tamper: str | None = None, **kwargs):
        self.tamper = tamper
        super().__init__(tensors, dht, **kwargs)

    def get_current_state(self):
        with self.get_tensors() as tensors:
            state = [t.clone() for t in tensors]
        if self.tamper == "nan":  # its own state went NaN: the manifest matches it
            state[0][0, 0] = math.nan
        return self.with_manifest({"donor": str(self.peer_id)}, state)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        messages = [message async for message in super().rpc_download_state(request, context)]
        if self.tamper == "cut":  # the stream ends at a tensor boundary: hivemind saw nothing wrong
            messages = messages[:-1]
        elif self.tamper == "flip":  # one byte of the last tensor changed in transit
            part = messages[-1].tensor_part
            part.buffer = part.buffer[:-1] + bytes([part.buffer[-1] ^ 1])
        for message in messages:
            yield message


@pytest.mark.timeout(120)
def test_a_cut_corrupted_or_nan_download_is_discarded_and_the_next_donor_serves():
    honest = [torch.full((4, 8), 1.0), torch.arange(16.0)]
    first = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    initial = [str(a) for a in first.get_visible_maddrs()]
    dhts = [first] + [start_dht(initial, ["/ip4/127.0.0.1/tcp/0"], [], None) for _ in range(4)]
    common = {"prefix": "checked", "start": True, "min_matchmaking_time": 1.0, "request_timeout": 0.5}
    donors = [
        _Donor([t + 100 * (tamper is not None) for t in honest], dht, tamper=tamper, **common)
        for dht, tamper in zip(dhts[:4], ("cut", "flip", "nan", None), strict=True)
    ]
    newcomer = _Donor([torch.zeros_like(t) for t in honest], dhts[4], **common)
    try:
        for priority, donor in zip((4, 3, 2, 1), donors, strict=True):  # the tampering ones are asked first
            donor.state_sharing_priority = priority
        wait_until(lambda: other_donors(dhts[4], newcomer) >= 4, 30, "the four donors' records")
        loaded = newcomer.load_state_from_peers(timeout=30)
        assert loaded is not None, "the honest donor was never asked"
        metadata, tensors = loaded
        assert metadata["donor"] == str(dhts[3].peer_id)
        for got, expected in zip(tensors, honest, strict=True):
            assert torch.equal(got, expected)
        assert newcomer.discarded_downloads == 3
    finally:
        for averager in (newcomer, *donors):
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
