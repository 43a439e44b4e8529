"""Averaging rounds that say what they really did.

hivemind 1.1.12 counts a round as done although part of the average never arrived: when the peer that
reduces a part times out, the others keep their *own* values in that part, and only hivemind's log says
so ("Averaging: received 89.1% results"; with a reducer that died, 0.0 %). A DiLoCo joiner then applied
an outer step 0.074 away from the others' (tests/test_diloco.py). :class:`CheckedRounds` adds the share
that arrived to the round's result (:func:`received_fraction`), so callers can count such a round as
failed. Matchmaking does not look at the step a round is for either: a group key that carries the step
(:func:`round_bits`, DiLoCo's outer rounds) keeps rounds of different steps apart; where the key must
stay fixed (the state and gradient rounds), ``step_spread`` makes a group whose peers gathered steps too far
apart skip its all-reduce.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import time
from concurrent.futures import InvalidStateError

from hivemind.averaging import DecentralizedAverager

from potluck.hivemind_ext.allreduce import aggregator_in_use

UPSTREAM = {
    "hivemind.averaging.averager.DecentralizedAverager._aggregate_with_group": "c297d8a435ce2b1c",  # overridden; keeps its runner in _running_groups
    "hivemind.averaging.averager.DecentralizedAverager._register_allreduce_group": "5bf43ed9b95db37d",  # a skipped round's runner future is cancelled, so it does not warn
    "hivemind.averaging.averager.DecentralizedAverager._shutdown": "f1777b2ac329932a",  # copied: finalizes the runners, not their futures
    "hivemind.averaging.averager.DecentralizedAverager._step": "dfbb4416e9ebba51",  # catches asyncio's InvalidStateError, not concurrent.futures'
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""

ROUND_BITS = 16
"""Bits of the step in an averager's group key: rounds 2**16 steps apart could meet."""
PARTIAL = "potluck:received_fraction"
"""Key added to a round's gathered data when only this fraction of the average arrived: of the averaged parts this
peer got back, or of the senders' parts that reached what it reduced, whichever is less."""


def round_bits(step: int) -> str:
    return format(step % 2**ROUND_BITS, f"0{ROUND_BITS}b")


def received_fraction(gathered) -> float:
    """The share of the average that arrived in a round (1.0: all of it)."""
    return float(gathered.get(PARTIAL, 1.0)) if isinstance(gathered, dict) else 1.0


def group_of(gathered) -> dict:
    """The round's peers and what each gathered (without :data:`PARTIAL`)."""
    return {peer: data for peer, data in gathered.items() if peer != PARTIAL}


logger = logging.getLogger(__name__)


def step_of(data) -> int | None:
    """The step a peer gathered for its round: the data itself (state rounds) or its ``"step"`` (gradient
    rounds, :func:`gradient_round_data`); None when it gathered none."""
    if isinstance(data, dict):
        data = data.get("step")
    return data if isinstance(data, int) and not isinstance(data, bool) else None


def steps_gathered(gathered) -> set[int]:
    """The distinct steps that a round's peers gathered (peers that gathered no step are left out)."""
    return {step for data in group_of(gathered).values() if (step := step_of(data)) is not None}


def gradient_round_data(step: int, client_mode: bool) -> dict:
    """What a peer gathers for a gradient round: the global step its gradients are for, and whether it is
    behind NAT (a client-mode peer's step is not the swarm's: :func:`public_step`)."""
    return {"step": step, "client": client_mode}


def public_step(gathered) -> int | None:
    """The newest step that a public peer (one that accepts connections) of a gradient round gathered."""
    steps = [
        step
        for data in group_of(gathered).values()
        if isinstance(data, dict) and not data.get("client") and (step := step_of(data)) is not None
    ]
    return max(steps, default=None)


class CheckedRounds(DecentralizedAverager):
    """Adds :data:`PARTIAL` to a round's result when some of the average never arrived.

    With ``step_spread``, a group whose peers gathered steps further apart than that (each gathers the step
    its round is for) skips the all-reduce: every member sees the same gathered data, so all of them skip,
    and each keeps its own tensors. The round still returns what was gathered, so the caller sees the
    other peers' steps; a gradient round (``skipped_is_partial``) also says that none of the average
    arrived."""

    step_spread: int | None = None
    """The most steps a group's peers may be apart and average (0: the same step only); None: not checked."""
    skipped_is_partial = False

    async def _shutdown(self, timeout: float | None) -> None:
        # NOTE: hivemind's own, except for the running groups: upstream calls finalize() on the future
        # that holds each group's all-reduce runner and waits on what it returns (finalize returns
        # None), so an averager shut down with a round still running (a peer leaving on a signal)
        # printed an AttributeError traceback. Here the runner is finalized (cancelled), or its
        # future cancelled when it has none yet; nothing is left to wait for.
        if not self.client_mode:
            await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        for future in self._running_groups.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().finalize(cancel=True)
            else:
                future.cancel()

    async def _step(self, *, step, future_for_init):
        try:
            return await super()._step(step=step, future_for_init=future_for_init)
        except InvalidStateError:
            # a round cancelled (its peer leaving) just as its all-reduce ended: hivemind's set_result raises
            # concurrent.futures' InvalidStateError, which its handler (asyncio's) does not catch, and the
            # averager's log got "Task exception was never retrieved"; nobody waits for the result
            if not step.cancelled():
                raise

    async def _aggregate_with_group(self, group_info, *args, **kwargs):
        rule = aggregator_in_use()
        if rule.robust and len(group_info.peer_ids) < rule.min_group_size:
            # a robust rule cannot outvote f attackers in a group of 2f or fewer (measured: a sign-flipping peer
            # paired with one honest peer sent the run's loss from 2.0 to 7.9): nobody averages, each keeps its
            # own tensors, and the round says none of the average arrived
            logger.info(
                f"{type(self).__name__}: a group of {len(group_info.peer_ids)} cannot outvote {rule.attackers}"
                f" attacker(s) under {rule.kind} (it needs {rule.min_group_size}): not averaged"
            )
            self._running_groups[group_info.group_id].cancel()  # no runner: nobody sends parts
            return {**self._gathered_by_peer(group_info), PARTIAL: 0.0}
        if self.step_spread is not None:
            gathered = self._gathered_by_peer(group_info)
            if (steps := steps_gathered(gathered)) and max(steps) - min(steps) > self.step_spread:
                logger.info(
                    f"{type(self).__name__}: a round met peers at steps {sorted(steps)}; each keeps its own tensors"
                )
                self._running_groups[group_info.group_id].cancel()  # no runner: nobody sends parts
                return {**gathered, PARTIAL: 0.0} if self.skipped_is_partial else gathered
        gathered = await super()._aggregate_with_group(group_info, *args, **kwargs)
        running = self._running_groups.get(group_info.group_id)  # hivemind keeps the round's runner here
        runner = running.result() if running is not None and running.done() else None
        arrived = 1.0
        container = getattr(runner, "tensor_part_container", None)
        if container is not None and container.failed_size:
            arrived = 1.0 - container.failed_size / container.total_size
        # What this peer reduced for the group: a sender whose parts never came (a client that had given up on
        # the round when the leader's go arrived, on a busy machine) is left out of those parts' average, and
        # hivemind only logs it ("Reducer: received 50.0% of input tensors"). A DiLoCo peer then took the
        # average of itself alone for the group's, while its partner caught up by download.
        reducer = getattr(runner, "tensor_part_reducer", None)
        if reducer is not None and reducer.num_parts and reducer.num_senders:
            expected = reducer.num_parts * reducer.num_senders
            arrived = min(arrived, sum(reducer.num_parts_received) / expected)
        if arrived < 1.0:
            gathered = {**gathered, PARTIAL: arrived}
        return gathered

    def _gathered_by_peer(self, group_info) -> dict:
        """What each member of the group gathered (the caller's data), by peer id, as hivemind returns it."""
        return {
            peer: self.serializer.loads(data)
            for peer, (_, _, data) in zip(
                group_info.peer_ids, map(self.serializer.loads, group_info.gathered), strict=True
            )
        }


class TimedRounds(DecentralizedAverager):
    """Records when the last round's group was formed and when its all-reduce ended, so that the caller can say
    where a round's time went: finding the group (a kept group's check-ins, or matchmaking) or the all-reduce.

    The times are ``time.monotonic()`` of the averager's process (the machine's monotonic clock, the same in the
    caller's), written there and read in the caller's after the round's result arrived."""

    def __init__(self, *args, **kwargs):
        self._round_times = mp.Array(ctypes.c_double, 2)  # grouped, reduced; 0.0: not (yet) in the last round
        super().__init__(*args, **kwargs)

    def last_round_times(self) -> tuple[float, float]:
        """When the last round that formed a group got it, and when its all-reduce ended (0.0: did not)."""
        with self._round_times.get_lock():
            return self._round_times[0], self._round_times[1]

    async def _aggregate_with_group(self, group_info, *args, **kwargs):
        with self._round_times.get_lock():
            self._round_times[0], self._round_times[1] = time.monotonic(), 0.0
        try:
            return await super()._aggregate_with_group(group_info, *args, **kwargs)
        finally:
            self._round_times[1] = time.monotonic()
