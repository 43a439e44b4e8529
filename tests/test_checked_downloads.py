"""A state download that is not what its donor sent, or that holds NaN, is never used: real averagers on a
loopback DHT, two donors that tamper with their own streams, one whose own state holds NaN, and one honest
donor of lower priority. Under a robust aggregator a newcomer prefers a state two donors vouch for."""

from __future__ import annotations

import math
from typing import (  # noqa: UP035 (hivemind reads the stream type from typing's alias only)
    AsyncIterator,
    NamedTuple,
)

import pytest
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

from potluck.hivemind_ext.aggregators import Aggregator
from potluck.hivemind_ext.allreduce import aggregate_with
from potluck.hivemind_ext.ctrl_c import KeepsCtrlC
from potluck.hivemind_ext.dht import start_dht
from potluck.hivemind_ext.donors import CheckedDownloads, donor_priorities, other_donors
from tests.helpers import wait_until


class _Donor(CheckedDownloads, KeepsCtrlC):
    """Serves its averaged tensors; ``tamper`` spoils the stream after the manifest was made, or (``lie``)
    serves ``lie_with``'s manifest with its own tensors, or (``busy``) answers only the probe for its manifest."""

    def __init__(self, tensors, dht, *, tamper: str | None = None, lie_with=None, **kwargs):
        self.tamper, self.lie_with = tamper, lie_with
        super().__init__(tensors, dht, **kwargs)

    def get_current_state(self):
        with self.get_tensors() as tensors:
            state = [t.clone() for t in tensors]
        if self.tamper == "nan":  # its own state went NaN: the manifest matches it
            state[0][0, 0] = math.nan
        metadata = {"donor": str(self.peer_id), "epoch": 7}
        if self.tamper == "lie":  # claims the honest peers' digests, sends its own tensors
            return self.with_manifest(metadata, self.lie_with)[0], state, None
        return self.with_manifest(metadata, state)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        self.calls = getattr(self, "calls", 0) + 1
        if self.tamper == "busy" and self.calls > 1:  # answers the probe for its manifest, then has no slot
            return
        messages = [message async for message in super().rpc_download_state(request, context)]
        if self.tamper == "cut":  # the stream ends at a tensor boundary: hivemind saw nothing wrong
            messages = messages[:-1]
        elif self.tamper == "flip":  # one byte of the last tensor changed in transit
            part = messages[-1].tensor_part
            part.buffer = part.buffer[:-1] + bytes([part.buffer[-1] ^ 1])
        for message in messages:
            yield message


class _Loaded(NamedTuple):
    state: tuple | None
    """What ``load_state_from_peers`` returned: (metadata, tensors), or None."""
    discarded: int
    unvouched: int
    donors: list[str]
    """The donors' peer ids, in the order given."""


def _newcomer_loads(*donor_states, tampers=None, lie_with=None, own=None) -> _Loaded:
    """A newcomer's download from real donors on a loopback DHT holding ``donor_states`` (the first asked
    first; ``tampers``: each one's, see :class:`_Donor`); the newcomer's own tensors are ``own`` (zeros)."""
    tampers = tampers or [None] * len(donor_states)
    first = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    initial = [str(a) for a in first.get_visible_maddrs()]
    dhts = [first] + [start_dht(initial, ["/ip4/127.0.0.1/tcp/0"], [], None) for _ in donor_states]
    common = {"prefix": "vouched", "start": True, "min_matchmaking_time": 1.0, "request_timeout": 0.5}
    donors = [
        _Donor(state, dht, tamper=tamper, lie_with=lie_with, **common)
        for dht, state, tamper in zip(dhts, donor_states, tampers, strict=False)
    ]
    newcomer = _Donor(own or [torch.zeros_like(t) for t in donor_states[0]], dhts[-1], **common)
    try:
        for priority, donor in enumerate(reversed(donors), start=1):
            donor.state_sharing_priority = priority
        wait_until(lambda: other_donors(dhts[-1], newcomer) >= len(donors), 30, "the donors' records")
        # and their priorities: each was first published as 0, and a newcomer that read those asked the donors
        # in random order (a two-worker suite: the honest donor before a tampering one, 2 downloads discarded)
        wait_until(lambda: _priorities_published(dhts[-1], donors), 30, "the donors' priorities")
        loaded = newcomer.load_state_from_peers(timeout=30)
        ids = [str(dht.peer_id) for dht in dhts[: len(donors)]]
        return _Loaded(loaded, newcomer.discarded_downloads, newcomer.unvouched_downloads, ids)
    finally:
        for averager in (newcomer, *donors):
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def _priorities_published(dht, donors) -> bool:
    """Whether the DHT holds each donor's record with its ``state_sharing_priority`` (what a newcomer orders by)."""
    priorities = donor_priorities(dht, "vouched")
    return all(priorities.get(d.peer_id.to_bytes()) == d.state_sharing_priority for d in donors)


@pytest.mark.timeout(120)
def test_a_cut_corrupted_or_nan_download_is_discarded_and_the_next_donor_serves():
    honest = [torch.full((4, 8), 1.0), torch.arange(16.0)]
    tampers = ("cut", "flip", "nan", None)  # the tampering ones are asked first
    states = [[t + 100 * (tamper is not None) for t in honest] for tamper in tampers]
    found = _newcomer_loads(*states, tampers=tampers)
    assert found.state is not None, "the honest donor was never asked"
    metadata, tensors = found.state
    assert metadata["donor"] == found.donors[3]
    for got, expected in zip(tensors, honest, strict=True):
        assert torch.equal(got, expected)
    assert found.discarded == 3


@pytest.mark.timeout(180)
@pytest.mark.parametrize("aggregator", ["mean", "trimmed_mean"])
def test_under_a_robust_aggregator_a_newcomer_takes_only_a_state_two_donors_vouch_for(aggregator):
    """An attacker asked first serves its own state (its manifest true to it); two honest donors hold the
    same one. Under the mean the newcomer trusts the first donor, as hivemind does; under a robust rule
    it takes the state the two honest donors vouch for."""
    honest = [torch.full((4, 8), 1.0), torch.arange(16.0)]
    forged = [-10 * t for t in honest]
    aggregate_with(Aggregator(aggregator))
    try:
        loaded, discarded, unvouched, _ = _newcomer_loads(forged, honest, [t.clone() for t in honest])
    finally:
        aggregate_with(Aggregator())
    assert loaded is not None
    metadata, tensors = loaded
    expected = honest if aggregator == "trimmed_mean" else forged
    for got, want in zip(tensors, expected, strict=True):
        assert torch.equal(got, want)
    assert discarded == unvouched == 0


@pytest.mark.timeout(180)
def test_a_donor_that_claims_the_honest_manifest_is_discarded_and_a_pair_that_disagrees_is_taken_unvouched():
    honest = [torch.full((4, 8), 1.0), torch.arange(16.0)]
    forged = [-10 * t for t in honest]
    aggregate_with(Aggregator("median"))
    try:
        # the liar is asked first and is in the vouching group by its manifest: its download is discarded
        loaded, discarded, unvouched, _ = _newcomer_loads(
            forged, honest, [t.clone() for t in honest], tampers=["lie", None, None], lie_with=honest
        )
        assert loaded is not None and (discarded, unvouched) == (1, 0)
        for got, want in zip(loaded[1], honest, strict=True):
            assert torch.equal(got, want)
        # one honest donor and one attacker: nobody can tell which is which; the newest donor's state is
        # taken as under the mean (refusing it stalled honest peers that had drifted apart), and counted
        loaded, discarded, unvouched, _ = _newcomer_loads(forged, honest)
        assert loaded is not None and (discarded, unvouched) == (0, 1)
        for got, want in zip(loaded[1], forged, strict=True):
            assert torch.equal(got, want)
    finally:
        aggregate_with(Aggregator())


@pytest.mark.timeout(180)
def test_where_no_two_of_three_donors_vouch_a_newcomer_takes_their_median_state():
    """Three donors at three different states (honest peers that drifted apart, and an attacker whose state
    went far off): under a robust rule the newcomer takes the coordinate-wise median of the three, never the
    attacker's state, however high its priority; under the mean it takes the first donor's, as hivemind does."""
    honest = [torch.full((4, 8), 1.0), torch.arange(16.0)]
    drifted = [t + 0.5 for t in honest]
    forged = [1000 * torch.randn_like(t) for t in honest]
    for aggregator in ("median", "mean"):
        aggregate_with(Aggregator(aggregator))
        try:
            loaded, discarded, unvouched, donors = _newcomer_loads(forged, honest, drifted)
        finally:
            aggregate_with(Aggregator())
        assert loaded is not None and (discarded, unvouched) == (0, int(aggregator == "median")), aggregator
        metadata, tensors = loaded
        if aggregator == "mean":
            assert metadata["donor"] == donors[0]
            assert all(torch.equal(got, want) for got, want in zip(tensors, forged, strict=True))
            continue
        assert sorted(metadata["donor"].split("+")) == sorted(donors)
        medians = [torch.stack(ts).median(dim=0).values for ts in zip(forged, honest, drifted, strict=True)]
        for got, want, low, high in zip(tensors, medians, honest, drifted, strict=True):
            assert torch.equal(got, want)
            assert bool(((low <= got) & (got <= high)).all())  # within the honest donors' values, everywhere


@pytest.mark.timeout(180)
def test_where_one_of_three_unvouched_donors_is_busy_a_peer_takes_the_state_nearest_its_own():
    """A peer catching up, its own state near the honest ones; of three donors that vouch for nothing the
    honest one asked last has no slot left: of the two states it got, it takes the one nearer its own,
    not the first donor's (the attacker's)."""
    honest = [torch.full((4, 8), 1.0), torch.arange(16.0)]
    behind = [t - 0.1 for t in honest]
    drifted = [t + 0.5 for t in honest]
    forged = [-10 * t for t in honest]
    aggregate_with(Aggregator("trimmed_mean"))
    try:
        loaded, discarded, unvouched, donors = _newcomer_loads(
            forged, drifted, honest, tampers=[None, None, "busy"], own=behind
        )
    finally:
        aggregate_with(Aggregator())
    assert loaded is not None and (discarded, unvouched) == (0, 1)
    assert loaded[0]["donor"] == donors[1]
    assert all(torch.equal(got, want) for got, want in zip(loaded[1], drifted, strict=True))
