"""The end of a run: peers that ended it together agree on one state before their last checkpoint.

Peers that took every global step together hold bit-equal states, but the last step's rounds can end
differently on each side (a gradient round whose parts arrived on one side only, a state round one peer
missed), and no later round evens it out: in CI the two peers of a pair ended with different adapters
(tests/test_families.py, four pairs on two cores). At the end each peer marks the state it serves as final
(``CheckedDownloads.final_step``), reads every other donor's manifest (:meth:`CheckedDownloads.probe_donors`)
and, where the final states differ, every peer picks the same one (:func:`chosen`): the state most final peers
hold, ties broken by its digests, so each side makes the same choice from the same manifests. Peers that left
still count with the state they held, and each final peer serves how many holders of its state it saw
(``SUPPORT_KEY``), so a laggard that arrives after most of the majority left still picks the majority's state
(under load one of four peers reached the end 15 s after the others; the last two then tied). A peer that holds
another downloads it from a peer that holds it, checked against that manifest. Under a robust aggregator a
state is taken only from a majority of at least two (one attacker's state never wins a tie). A peer leaves once
every other final peer holds its state, or after ``wait`` seconds. A peer in client mode serves nothing: it
takes the public peers' choice and does not vote.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from potluck.hivemind_ext.donors import FINAL_KEY, SUPPORT_KEY, UNREACHABLE, CheckedDownloads, state_key

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""How often a peer reads the others' manifests while they are not all final, or not all equal."""


@dataclass(frozen=True)
class Agreement:
    outcome: str
    """``agreed`` (every final peer held this peer's state), ``took`` (it downloaded the chosen one), ``apart``
    (the final peers still differ at the deadline, or no state may be chosen), ``alone`` (no other final peer),
    ``skipped`` (states travel compressed: no digests to compare)."""
    peers: int
    """Final peers seen at the end, this one included."""
    holding: int
    """Of those, the peers that held the state this one ended with."""


def support(states: dict[str, dict], holders: list[str], robust: bool) -> int:
    """How many final peers hold the state of ``holders``: those here, or more where one of them says it saw
    more (``SUPPORT_KEY``; peers that saw them have left). Under a ``robust`` rule only those here count (an
    attacker would claim any number)."""
    claimed = [states[p].get(SUPPORT_KEY) for p in holders] if not robust else []
    return max([len(holders), *(n for n in claimed if isinstance(n, int) and not isinstance(n, bool))])


def chosen(states: dict[str, dict], robust: bool) -> list[str] | None:
    """The peers (ids, sorted) that hold the state every final peer takes, from each one's served metadata:
    the state most final peers hold (:func:`support`), ties broken by the larger step and digests. Under a
    ``robust`` rule only a majority of at least two; None when no state may be taken (or none has digests)."""
    groups: dict[tuple, list[str]] = {}
    for peer, metadata in states.items():
        if (key := state_key(metadata)) is not None:
            groups.setdefault(key, []).append(peer)
    if not groups:
        return None
    members = groups[
        max(
            groups,
            key=lambda key: (support(states, groups[key], robust), -1 if key[0] is None else key[0], key[1]),
        )
    ]
    if robust and (len(members) < 2 or 2 * len(members) <= len(states)):
        return None
    return sorted(members)


def _may_still_end_here(probe, step: int) -> bool:
    """Whether a donor not final at ``step`` yet may still be: it answered nothing (busy) or is at ``step`` or
    before. One past it, final at another step or unreachable is not waited for."""
    if probe is None:
        return True
    if probe == UNREACHABLE or not isinstance(probe, dict) or probe.get(FINAL_KEY) is not None:
        return False
    epoch = probe.get("epoch")
    return not isinstance(epoch, int) or epoch <= step


def agree_on_final_state(
    averager: CheckedDownloads,
    step: int,
    *,
    take: Callable[[list[str], dict], bool],
    wait: float,
    probe_timeout: float,
    robust: bool,
    serving: bool = True,
    stopping: Callable[[], bool] = lambda: False,
) -> Agreement:
    """Agree with the other peers that ended at global ``step`` on one state (see the module docstring).
    ``take(donors, metadata)``: download the state ``metadata`` describes from one of ``donors`` and use it
    (True when it did). ``serving``: this peer serves its state (not in client mode). Bounded by ``wait``
    seconds; a stop request ends it at once."""
    averager.final_step = step
    own_id = str(averager.peer_id)
    deadline = time.monotonic() + wait
    took = False
    seen: dict[str, dict] = {}  # every final peer's last state, those that left since included
    own = averager.get_current_state()[0]  # (a copy of the whole state, digested: again only after a take)
    while True:
        if (own_key := state_key(own)) is None:
            return Agreement("skipped", 1, 1)
        probes = averager.probe_donors(probe_timeout)
        final = {peer: p for peer, p in probes.items() if isinstance(p, dict) and p.get(FINAL_KEY) == step}
        seen.update(final)
        waiting = sum(_may_still_end_here(p, step) for peer, p in probes.items() if peer not in final)
        # the choice counts the peers that left too: the last two of four must not pick the laggard's state
        # in a tie once the others, who held the majority's, have gone
        states = {own_id: own, **seen} if serving else dict(seen)
        members = chosen(states, robust)
        holders = [p for p, m in states.items() if state_key(m) == own_key]
        averager.final_support = support(states, holders, robust) if holders else 1
        holding = 1 + sum(state_key(p) == own_key for p in final.values())
        out_of_time = time.monotonic() >= deadline or stopping()
        if not final and not waiting:
            return Agreement("alone", 1, 1)
        if members is None:
            if not waiting:
                out_of_time = True  # (no majority, and nobody left to make one)
        elif own_id in members or own_key == state_key(states[members[0]]):
            if not waiting and holding == 1 + len(final):
                return Agreement("took" if took else "agreed", 1 + len(final), holding)
        elif not waiting or out_of_time:
            logger.info(
                f"the run ended at global step {step}: {len(members)} of {len(states)} peers hold another "
                f"state than this one's; taking theirs"
            )
            if take(members, states[members[0]]):
                took = True
                own = averager.get_current_state()[0]
                continue
        if out_of_time:
            logger.warning(
                f"the run ended at global step {step}, and {holding} of {1 + len(final)} final peers hold this "
                f"peer's state ({waiting} not final yet): leaving apart"
            )
            return Agreement("apart", 1 + len(final), holding)
        time.sleep(POLL_SECONDS)
