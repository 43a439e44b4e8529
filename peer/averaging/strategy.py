"""How a peer combines its work with the swarm's: the interface every averaging strategy implements.

The trainer only calls :class:`AveragingStrategy`: ``step`` after each local backward,
``load_state_from_peers`` before training. Stages never see it, so another strategy (DiLoCo-style
local steps, ``diloco.py``) can replace per-step gradient averaging (``gradient.py``) without touching them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

from potluck.hivemind_ext.agreement import Agreement


def round_outcome(succeeded: bool, group_size: int) -> str:
    """``succeeded``, ``failed`` (the round broke) or ``alone`` (no other peer known or in the group: local
    gradients only). A step taken without another peer is not a success of averaging: a swarm whose peers
    keep missing each other trains like separate runs (kept in sync only by state averaging)."""
    return "failed" if not succeeded else "alone" if group_size <= 1 else "succeeded"


ROUND_PHASES = ("group", "all_reduce", "handoff", "apply")
"""Where a round's time goes (:func:`round_phases`)."""


def round_phases(
    started: float, grouped: float, reduced: float, applying: float, applied: float
) -> dict[str, float] | None:
    """A round's seconds by phase, from ``time.monotonic()`` readings: ``group`` (from its start until its group
    was formed: the wait for the others, then a kept group's check-ins or matchmaking), ``all_reduce``,
    ``handoff`` (until the caller had the result: across the averager's process), ``apply`` (what the caller
    did with it, e.g. DiLoCo's outer step). None when the readings do not describe one round in that order (the
    averager recorded no group for it)."""
    times = (started, grouped, reduced, applying, applied)
    if not all(0.0 < a <= b for a, b in pairwise(times)):
        return None
    return {phase: round(b - a, 6) for phase, (a, b) in zip(ROUND_PHASES, pairwise(times), strict=True)}


class AveragingListener(Protocol):
    """Receives what the strategy observes; the metrics module implements it."""

    def averaging_round(
        self,
        succeeded: bool,
        group_size: int,
        bytes_sent: int,
        bytes_received: int,
        seconds: float | None = None,
        kept: bool = False,
        phases: dict[str, float] | None = None,
    ) -> None:
        """One round ended; ``seconds``: how long it took, for rounds that formed a group; ``kept``: its group was
        the last round's, re-formed without matchmaking (``hivemind_ext/kept_groups.py``); ``phases``: where its
        time went, where the strategy measured it (:func:`round_phases`)."""

    def state_download(self, succeeded: bool, seconds: float, discarded: int = 0, unvouched: int = 0) -> None:
        """One download attempt ended; ``discarded``: downloads in it that did not match their donor's
        manifest (``hivemind_ext/donors.py``) and were thrown away."""


@dataclass(frozen=True)
class SwarmProgress:
    global_step: int
    peers: int
    """Peers that reported progress for this run recently (including this one)."""
    samples_accumulated: int
    """Samples the swarm has accumulated toward the next global step."""
    target_batch_size: int
    eta_next_step: float
    """Estimated seconds until the next global step."""


class AveragingStrategy(ABC):
    last_state_donor: str | None = None
    """The peer id of the donor that served the last state download (when it said)."""

    @property
    @abstractmethod
    def global_step(self) -> int: ...

    @abstractmethod
    def load_state_from_peers(self) -> int | None:
        """Download the swarm's current state if anybody has it.

        Returns the global step of the downloaded state (the strategy may then count itself one step
        further, if the swarm moved on during the download), or None if nobody answered in time."""

    @abstractmethod
    def peers_in_run(self) -> int:
        """Announce this peer in the run and return how many peers (this one included) are announced."""

    @abstractmethod
    def step(self, batch_size: int) -> bool:
        """Account for a local batch whose gradients are in ``.grad``; True if a global step was taken."""

    def batch_share(self, full: int) -> int:
        """How many samples the next local batch should hold, at most ``full`` (the spec's per-peer
        batch): less when the swarm needs fewer for its next global step. Default: always ``full``."""
        return full

    def request_stop(self) -> None:  # noqa: B027 (optional: a strategy may have nothing to cut short)
        """This peer was asked to leave (called from a signal handler: only note it). Waits on the swarm
        that are still running end within seconds instead of their timeouts. Default: nothing to cut short."""

    def request_hold(self, held: bool) -> None:  # noqa: B027 (optional: a strategy may never wait long)
        """The run was paused or finished (``held``), or is active again, at its coordinator (called from
        the thread that watches the status: only note it). A wait on the swarm that others who already hold
        would never end is cut short; the training loop pauses at its next local step (:meth:`pause`).
        Default: nothing to cut short."""

    def pause(self) -> None:  # noqa: B027 (optional: a strategy may have nothing scheduled ahead)
        """The run is paused (this peer takes no step until :meth:`resume`) or finished (it leaves). Release
        what waits for its next step (a round scheduled ahead), so that the peers it would have averaged
        with are not held. Default: nothing to release."""

    def resume(self) -> None:  # noqa: B027 (optional)
        """The run is active again after :meth:`pause`: the time held must not count as time spent
        training (throughput estimates, waits for the others). Default: nothing to reset."""

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def progress(self) -> SwarmProgress: ...

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @abstractmethod
    def settle(self) -> Agreement | None:
        """Finish averaging that still runs in the background and bring its result into the model
        (before the last checkpoint: there is no next step that would). Where the strategy checks that the
        peers that ended the run together hold one state, how they agreed on it (``hivemind_ext/agreement.py``)."""

    @abstractmethod
    def shutdown(self) -> None: ...
