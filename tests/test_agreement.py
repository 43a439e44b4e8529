"""At the end of a run the peers that ended it together agree on one state (``hivemind_ext/agreement.py``): the
choice itself (unit), and real averagers on a loopback DHT that end with different states and leave with one."""

from __future__ import annotations

import threading

import pytest
import torch

from potluck.hivemind_ext.agreement import Agreement, agree_on_final_state, chosen
from potluck.hivemind_ext.ctrl_c import KeepsCtrlC
from potluck.hivemind_ext.dht import start_dht
from potluck.hivemind_ext.donors import (
    CheckedDownloads,
    StoppableDownloads,
    other_donors,
    state_key,
    tensor_manifest,
)
from tests.helpers import wait_until

STEP = 7


def _served(tensors, step: int = STEP, **extra) -> dict:
    return {"epoch": step, "manifest": tensor_manifest(tensors, exact=True), **extra}


A = [torch.ones(4, 8), torch.arange(16.0)]
B = [t + 1 for t in A]
C = [t - 1 for t in A]


@pytest.mark.unit
def test_the_state_most_peers_hold_is_chosen_and_a_tie_is_broken_the_same_way_on_every_side():
    assert chosen({"p": _served(A), "q": _served(B), "r": _served(A)}, robust=False) == ["p", "r"]
    # a tie: each side sees the same manifests (in another order) and picks the same state
    tie = {"p": _served(A), "q": _served(B)}
    assert chosen(tie, robust=False) == chosen(dict(reversed(tie.items())), robust=False)
    # the same tensors labelled with another global step are another state
    assert state_key(_served(A)) != state_key(_served(A, step=STEP + 1))
    # a state sent compressed has no digests to compare
    assert state_key({"epoch": STEP, "manifest": tensor_manifest(A, exact=False)}) is None


@pytest.mark.unit
def test_under_a_robust_rule_only_a_majority_of_two_or_more_is_taken():
    assert chosen({"p": _served(A), "q": _served(B), "r": _served(A)}, robust=True) == ["p", "r"]
    assert chosen({"p": _served(A), "q": _served(B)}, robust=True) is None  # a tie: one may be an attacker
    assert chosen({"p": _served(A), "q": _served(B), "r": _served(C)}, robust=True) is None
    assert chosen({"p": _served(A), "q": _served(A), "r": _served(B), "s": _served(B)}, robust=True) is None


class _Peer(CheckedDownloads, StoppableDownloads, KeepsCtrlC):
    """Serves its averaged tensors as the state of global step ``STEP`` (``epoch``: another)."""

    epoch = STEP

    def get_current_state(self):
        with self.get_tensors() as tensors:
            state = [t.clone() for t in tensors]
        return self.with_manifest({"epoch": self.epoch, "donor": str(self.peer_id)}, state)

    def take(self, donors: list[str], metadata: dict) -> bool:
        loaded = self.load_state_from_peers(
            timeout=30, only=donors, expected=(metadata["epoch"], metadata["manifest"])
        )
        if loaded is None:
            return False
        with self.get_tensors() as tensors:
            for mine, theirs in zip(tensors, loaded[1], strict=True):
                mine.copy_(theirs)
        return True


def _end_together(*states, robust=False, epochs=None, wait=20.0) -> tuple[list[Agreement], list[list]]:
    """Peers on a loopback DHT holding ``states`` (of global step ``epochs``, default all ``STEP``) each agree
    at once, in a thread of its own, on the state of ``STEP``: their agreements and the tensors they end with."""
    first = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    initial = [str(a) for a in first.get_visible_maddrs()]
    dhts = [first] + [start_dht(initial, ["/ip4/127.0.0.1/tcp/0"], [], None) for _ in states[1:]]
    common = {"prefix": "agreement", "start": True, "min_matchmaking_time": 1.0, "request_timeout": 0.5}
    peers = [
        _Peer([t.clone() for t in state], dht, **common) for dht, state in zip(dhts, states, strict=True)
    ]
    agreements: list[Agreement | None] = [None] * len(peers)
    try:
        for peer, epoch in zip(peers, epochs or [STEP] * len(peers), strict=True):
            peer.epoch = epoch
            peer.state_sharing_priority = epoch
        for dht, peer in zip(dhts, peers, strict=True):
            wait_until(lambda: other_donors(dht, peer) >= len(peers) - 1, 30, "the donors' records")  # noqa: B023

        def agree(i: int) -> None:
            if peers[i].epoch == STEP:
                agreements[i] = agree_on_final_state(
                    peers[i], STEP, take=peers[i].take, wait=wait, probe_timeout=2.0, robust=robust
                )

        threads = [threading.Thread(target=agree, args=(i,)) for i in range(len(peers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=wait + 30)
        ended = []
        for peer in peers:
            with peer.get_tensors() as tensors:
                ended.append([t.clone() for t in tensors])
        return agreements, ended
    finally:
        for peer in peers:
            peer.shutdown()
        for dht in dhts:
            dht.shutdown()


def _equal(x: list, y: list) -> bool:
    return all(torch.equal(a, b) for a, b in zip(x, y, strict=True))


@pytest.mark.timeout(180)
def test_peers_that_end_apart_leave_with_the_state_most_of_them_hold():
    agreements, ended = _end_together(A, B, A)
    assert all(_equal(tensors, A) for tensors in ended)
    assert [a.outcome for a in agreements] == ["agreed", "took", "agreed"]
    assert all((a.peers, a.holding) == (3, 3) for a in agreements)


@pytest.mark.timeout(180)
def test_two_peers_that_end_apart_leave_with_one_state_and_a_peer_still_training_is_not_waited_for():
    """The third peer is at a later global step (it trains on): the two final ones agree without it."""
    agreements, ended = _end_together(A, B, C, epochs=[STEP, STEP, STEP + 2])
    assert _equal(ended[0], ended[1]) and _equal(ended[2], C)
    assert sorted(a.outcome for a in agreements[:2]) == ["agreed", "took"]


@pytest.mark.timeout(180)
def test_under_a_robust_rule_peers_without_a_majority_leave_apart_without_waiting_out_the_deadline():
    agreements, ended = _end_together(A, B, C, robust=True, wait=60.0)
    assert [a.outcome for a in agreements] == ["apart"] * 3
    assert [_equal(e, s) for e, s in zip(ended, (A, B, C), strict=True)] == [True] * 3


@pytest.mark.unit
def test_peers_that_left_count_through_the_holders_they_were_seen_by():
    """The last two of four: the laggard's state and one peer of the majority, which saw three hold its state
    before two of them left. The majority's state is chosen, not the tie's digest order (under a robust rule only
    the peers here count: an attacker would claim any support)."""
    last_two = {"p": _served(A, support=3), "q": _served(B, support=1)}
    assert chosen(last_two, robust=False) == ["p"]
    assert chosen({"p": _served(A, support=1), "q": _served(B, support=3)}, robust=False) == ["q"]
