"""hivemind's ``Optimizer`` and its averagers, with what Potluck needs changed (each class says what).

Upstream lacks: a bound on state-download retries (hivemind retries forever), rounds that report their
outcome, donors labelled with the step their parameters hold, state copied between optimizer steps,
Adam statistics re-shared after a load, a throttle on donor declarations, catch-up when a peer's
state rounds show it behind, and a way to stop stepping for a while (a paused run) without holding the
rounds it scheduled ahead. The strategy that drives it is ``peer/averaging/gradient.py``.

``listener`` is an ``AveragingListener`` (``peer/averaging/strategy.py``); ``deadlines`` a
``DeadlineWatch`` (``peer/averaging/deadlines.py``): both are passed in, so this folder imports nothing
of the peer.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent import futures

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.optim import Optimizer
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager, dump_optimizer_state

from potluck.hivemind_ext.agreement import Agreement, agree_on_final_state
from potluck.hivemind_ext.allreduce import aggregator_in_use
from potluck.hivemind_ext.donors import (
    MANIFEST_KEY,
    CheckedDownloads,
    LimitedDonor,
    StoppableDownloads,
    download_with_retries,
    other_donors,
)
from potluck.hivemind_ext.layers import PeerRounds
from potluck.hivemind_ext.rounds import (
    gradient_round_data,
    group_of,
    public_step,
    received_fraction,
    steps_gathered,
)
from potluck.hivemind_ext.tracker import SwarmAwareTracker, others_with_records

UPSTREAM = {
    "hivemind.optim.optimizer.Optimizer._make_state_averager": "59a43eff001c3284",  # its arguments are copied
    "hivemind.optim.optimizer.Optimizer._make_gradient_averager": "b9a4450197c1e6fb",  # called with our class and request timeout
    "hivemind.optim.optimizer.Optimizer._make_progress_tracker": "a3fe70a367d732d6",  # replaced: builds our tracker
    "hivemind.optim.optimizer.Optimizer._maybe_schedule_gradient_averaging": "868f8c36bdaa41e6",  # skipped while alone
    "hivemind.optim.optimizer.Optimizer._should_load_state_from_peers": "e1af5bdfc8e60b70",  # extended
    "hivemind.optim.optimizer.Optimizer._begin_averaging_gradients": "f17d8bb258a0c551",  # wrapped: skipped out of step, alone counted
    "hivemind.optim.optimizer.Optimizer._update_global_epoch": "03a36523a3fce65e",  # steps on local gradients when no round began
    "hivemind.optim.optimizer.Optimizer.load_state_from_peers": "87030a961ecf8f7f",  # re-implemented with a bound
    "hivemind.optim.optimizer.Optimizer._average_gradients_and_load_into_optimizer": "d95bb5ebc061749e",  # re-implemented to report rounds
    "hivemind.optim.optimizer.Optimizer._load_averaged_gradients_into_optimizer_": "cdf2fbb98f778b8d",  # called
    "hivemind.optim.optimizer.Optimizer._load_local_gradients_into_optimizer": "a87c64b6e88bf642",  # called
    "hivemind.optim.optimizer.Optimizer._tag_along_with_zero_weight": "a3181486ff4e2ac7",  # called; copied, bounded, in release_scheduled_rounds
    "hivemind.optim.optimizer.Optimizer.shutdown": "52e41b26128082bc",  # its release of scheduled rounds is copied (release_scheduled_rounds)
    "hivemind.optim.state_averager.TrainingStateAverager.get_current_state": "d2ee431a0a4b4074",  # wrapped
    "hivemind.optim.state_averager.TrainingStateAverager.step": "c68d9335d0ccf55e",  # wrapped
    "hivemind.optim.state_averager.TrainingStateAverager._update_scheduler": "9b8de2a7b6020122",  # called after a checkpoint load
    "hivemind.averaging.averager.DecentralizedAverager.state_sharing_priority": "de300bcec1decea5",  # setter throttled
    "hivemind.averaging.averager.DecentralizedAverager.load_state_from_peers": "973fae40a3d1e16f",  # wrapped
    "hivemind.optim.state_averager.TrainingStateAverager.load_state_from_peers": "e4d647a9ea78cde8",  # applies what the wrapper lets through, in dump_optimizer_state's order; refuses a state older than local_epoch
    "hivemind.optim.state_averager.dump_optimizer_state": "b79c35110b89e6b1",  # called: the order of the statistics
    "hivemind.optim.grad_averager.GradientAverager.schedule_step": "ff580482bac40508",  # extended: gathers the round's step
    "hivemind.optim.grad_averager.GradientAverager.step": "9d556a76d4a889cf",  # schedules every round it begins through it
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""

logger = logging.getLogger(__name__)

ALONE_CHECK_SECONDS = 0.25
"""While a round looks for its group, how often it checks whether the other peers have left."""
ALONE_RECHECK_SECONDS = 1.0
"""While a round looks for its group, how often the DHT is read for the other peers' records."""
STOP_GRACE_SECONDS = 2.0
"""After a stop request (a signal), how long a round or a background state round may still take to end
by itself before it is abandoned: a peer leaves within seconds even when a partner has hung."""
GRADIENT_AVERAGER_OPTS = ("request_timeout", "target_group_size", "min_group_size")
"""The keys of ``averager_opts`` that the gradient averager takes too (hivemind gives them to the state
averager only)."""


class _ThrottledDeclaration(DecentralizedAverager):
    """Re-announces this peer as a state donor at most every ``min_declare_interval`` seconds.

    hivemind's optimizer sets each averager's ``state_sharing_priority`` to the new global step after
    every step, and each change makes the averager store a fresh donor record in the DHT: with fast
    steps, two DHT stores per global step for a ranking that newcomers read rarely. In between, the
    priority is only recorded; the next due update (or hivemind's periodic re-declaration) announces it.
    """

    min_declare_interval = 1.0
    _declared_at = -math.inf

    @DecentralizedAverager.state_sharing_priority.setter
    def state_sharing_priority(self, value: float) -> None:
        now = time.monotonic()
        if self.client_mode or now - self._declared_at >= self.min_declare_interval:
            self._declared_at = now
            DecentralizedAverager.state_sharing_priority.fset(self, value)
        else:
            self._state_sharing_priority.value = value


class _StepsSeen(DecentralizedAverager):
    """Notes how far this peer's step was behind the newest step gathered in its state rounds (each peer
    gathers the step its round is for).

    A peer whose tracker still showed the swarm a step ahead (its view is up to seconds old) kept
    stepping one step at a time, hivemind's catch-up, while the others went on: on the home-like bed
    a healed peer stood 2-4 steps behind for half a minute (its state rounds with the others are not
    averaged: ``CheckedRounds.step_spread``). A round that shows another peer two or more steps ahead
    says so at once. A peer can also stay exactly one step behind for good: it steps in the same rounds as the
    others, and hivemind's once-per-step check of the swarm's step looks right after the step, when the
    others' records still hold their previous step, the one this peer has just reached (in CI a healed
    peer stayed so for the last 50 steps of the run, its parameters 1e-4 to 4e-3 from everyone's). One
    round at a lag of one can be the moment between two peers' steps, and downloading at each one cost
    the 2-peer PPO test its learning; two rounds in a row cannot.
    """

    _steps_behind: int = 0
    _rounds_behind: int = 0
    _rounds_to_read: list[StepControl] | None = None

    @property
    def steps_behind(self) -> int:
        """The most global steps this peer was behind the newest peer of a state round, since the
        optimizer last downloaded the swarm's state for it."""
        self._read_finished_rounds()
        return self._steps_behind

    @property
    def rounds_behind(self) -> int:
        """State rounds in a row in which this peer was behind another (0 after a round where it was not)."""
        self._read_finished_rounds()
        return self._rounds_behind

    def step(self, *args, **kwargs):
        control = super().step(*args, **kwargs)
        if isinstance(control, StepControl):  # a round in the background (wait=False, or scheduled)
            if self._rounds_to_read is None:
                self._rounds_to_read = []
            self._rounds_to_read.append(control)
        return control

    def _read_finished_rounds(self) -> None:
        # Read here, in the caller's thread, in the order the rounds ran: a done-callback runs in
        # hivemind's future thread and can come after the caller already saw the round finish (a
        # settled peer then asked too early, and did not yet know it was behind).
        rounds = self._rounds_to_read or []
        while rounds and rounds[0].done():
            control = rounds.pop(0)
            if control.cancelled() or control.exception() is not None:
                continue
            gathered = control.result()
            own = group_of(gathered).get(self.peer_id)
            if isinstance(own, int) and (steps := steps_gathered(gathered)):
                lag = max(steps) - own
                self._steps_behind = max(self._steps_behind, lag)
                self._rounds_behind = self._rounds_behind + 1 if lag > 0 else 0

    def out_of_step(self) -> bool:
        """Whether the state rounds say this peer should take the swarm's state (then forgets them): it
        was two or more steps behind in one, or behind in two in a row."""
        if self.steps_behind > 1 or self.rounds_behind > 1:
            self._steps_behind = self._rounds_behind = 0
            return True
        return False


class _DownloadRecorder(DecentralizedAverager):
    """Remembers what the last state download got (hivemind's optimizer does not say): whether it got
    anything, the global step it is of and the donor that served it."""

    last_download_ok = False
    last_download_epoch: int | None = None
    last_download_donor: str | None = None

    def load_state_from_peers(self, *args, **kwargs):
        loaded = super().load_state_from_peers(*args, **kwargs)
        metadata = loaded[0] if loaded is not None and isinstance(loaded[0], dict) else {}
        if loaded is not None and (problem := self.unusable(metadata, loaded[1])) is not None:
            logger.warning(f"not using the state downloaded from {metadata.get('donor')}: {problem}")
            loaded = None  # hivemind's caller then applies nothing
        self.last_download_ok = loaded is not None
        self.last_download_epoch = metadata.get("epoch") if loaded is not None else None
        self.last_download_donor = metadata.get("donor")
        return loaded

    def unusable(self, metadata: dict, tensors) -> str | None:
        """Why a download that matched its donor's manifest still cannot be used here (None: it can)."""
        return None


class LeftTheRound(Exception):
    """This peer is leaving and its gradient round had not ended within ``STOP_GRACE_SECONDS``: the
    global step is not taken (the peer keeps the state of its last one, the swarm's)."""


class RoundCalledOff(Exception):
    """The run was paused (or finished) while this peer's gradient round still looked for its group: the
    global step is not taken, and the round is left to end by itself (``BoundedOptimizer.hold``)."""

    def __init__(self, control: StepControl):
        super().__init__("the run is on hold")
        self.control = control


class StopRequest:
    """This peer was asked to leave (a signal). Set from a signal handler: it only records the time."""

    def __init__(self) -> None:
        self._at: float | None = None

    def set(self) -> None:
        if self._at is None:
            self._at = time.monotonic()

    def is_set(self) -> bool:
        return self._at is not None

    def expired(self) -> bool:
        """Whether the grace for rounds still running has passed (``STOP_GRACE_SECONDS``)."""
        return self._at is not None and time.monotonic() >= self._at + STOP_GRACE_SECONDS


class _ObservedStateAverager(
    CheckedDownloads,
    TrainingStateAverager,
    _StepsSeen,
    _DownloadRecorder,
    StoppableDownloads,
    _ThrottledDeclaration,
    LimitedDonor,
    PeerRounds,
):
    """MRO: TrainingStateAverager's ``super().load_state_from_peers`` lands in the recorder.

    State rounds are not keyed by global step (with the step in the group key, a peer cut off by a
    partition found nobody, lost the DHT's routing to the others and trained alone for good in 2 of 4
    runs of tests/test_faults.py), yet a round of step 11 meets one of step 12 on a loaded machine: the
    all-reduce then mixed parameters a whole update apart, and in 2 of 3 runs of the 2-peer swarm test
    beside two busy loops the peers ended 3e-3 apart although every gradient round had succeeded. Such a
    group skips its all-reduce (``step_spread``); what it gathered still shows a peer behind
    (``_StepsSeen``)."""

    step_spread = 0

    applied_epoch: int | None = None
    """The global step whose optimizer update the parameters hold; None: as ``local_epoch`` says
    (after a state download or a checkpoint, before this peer's next step)."""

    def get_current_state(self):
        # hivemind hands out the live offloaded tensors (.cpu() of a CPU tensor is itself), which are
        # streamed to the newcomer later while the next optimizer step writes them: a restarted peer
        # got 8 tensors of global step 12 and 12 of step 13. Copy them between optimizer steps.
        # hivemind also counts local_epoch up *before* the step's update runs in its executor, so a
        # download in between was labelled one step ahead of its parameters (a newcomer 3e-3 from
        # the donors' checkpoint of the step it reported): label what the parameters hold.
        with self.lock_optimizer:
            metadata, tensors, infos = super().get_current_state()
            if self.applied_epoch is not None:
                metadata["epoch"] = self.applied_epoch
            metadata["donor"] = str(self.peer_id)
            tensors = [t.clone() for t in tensors]
        return self.with_manifest(metadata, tensors, infos)

    def step(self, *args, optimizer_step: bool = False, **kwargs):
        # An optimizer step while the last step's state round still runs (hivemind waits for it only
        # when this step starts a round of its own, not while the last one all-reduces) went wrong
        # twice: the round had set the "optimizer step done" event on its way, so the step returned
        # before its update was made (run-peer then checkpointed the parameters of the step before);
        # and the round's average, taken before the update, was applied after it, undoing it on the
        # peers whose round ended late. Finish and apply the round first, as if it had been quicker.
        if optimizer_step and self.pending_updates:
            self._wait_for_pending_unless_alone()
            super().step(wait_for_delayed_updates=True)
        # leaving (settle, shutdown): a round whose partner hung would hold the exit for up to
        # averaging_timeout; the swarm's next state round evens out whatever this peer misses. At the end of a
        # run (settle) the last step's round of a peer that took it alone looked for the others, who had
        # finished, for its whole averaging_timeout: cancelled once they have all left (the end's agreement
        # then gives this peer their state, hivemind_ext/agreement.py)
        waiting = kwargs.get("wait_for_delayed_updates") and self.pending_updates
        if waiting and not self._wait_for_pending_unless_alone() and self.stop.is_set():
            logger.info("leaving without the result of the last state round (it had not ended)")
            return None
        return super().step(*args, optimizer_step=optimizer_step, **kwargs)

    alone: Callable[[float], bool] = staticmethod(lambda waiting_since: False)
    """Whether every other peer of the run has left (set by the optimizer: ``BoundedOptimizer._alone``)."""

    stop: StopRequest = StopRequest()
    """Set by the optimizer (``BoundedOptimizer.stop``); this default is never set."""

    def _wait_for_pending_unless_alone(self) -> bool:
        """Wait for the pending state round, up to ``averaging_timeout``; True if it ended.

        A state round started just before the other peers left (their withdrawn records not yet
        fetched) looks for them until averaging_timeout, and the next optimizer step waits for it:
        the peer left behind stood still for 15 s. Such a round is cancelled once they have all left.
        After a stop request it is given ``STOP_GRACE_SECONDS`` (then False)."""
        started = time.monotonic()
        deadline = started + (self._allreduce_timeout or 30.0)
        while time.monotonic() < deadline:
            if not futures.wait(self.pending_updates, timeout=ALONE_CHECK_SECONDS).not_done:
                return True
            if self.alone(started) or self.stop.expired():
                for control in self._rounds_to_read or []:
                    # Alone: a round still looking for its group (a round that runs has partners).
                    # Leaving: any round. hivemind's executor thread waits on the round's result up
                    # to averaging_timeout, and the interpreter's exit waits on that thread: a peer
                    # whose partner hung mid-round left 28 s after SIGTERM, its summary long written.
                    looking = control.stage == AveragingStage.LOOKING_FOR_GROUP
                    if not control.done() and (looking or self.stop.expired()):
                        control.cancel()
            if self.stop.expired():  # the thread sees the cancelled round at once
                return not futures.wait(self.pending_updates, timeout=ALONE_CHECK_SECONDS).not_done
        return not futures.wait(self.pending_updates, timeout=0).not_done

    def record_applied_epochs(self) -> None:
        """Note the global step of every optimizer update, inside hivemind's optimizer lock."""
        step = self.optimizer.step

        def step_and_record(*args, **kwargs):
            result = step(*args, **kwargs)
            self.applied_epoch = self.local_epoch  # hivemind waits for this step before the next epoch
            return result

        self.optimizer.step = step_and_record

    def unusable(self, metadata: dict, tensors) -> str | None:
        # hivemind applies the tensors unchecked: copy_ broadcasts a tensor of another shape into a
        # parameter, and Adam's statistics are loaded whatever their shape (the next step then fails).
        # A donor of another model (a misconfigured or forged peer) is refused here.
        own = [p for group in self.optimizer.param_groups for p in group["params"]]
        own += [*self.extra_tensors, *dump_optimizer_state(self.optimizer)[1]]
        if len(tensors) != len(own):
            return f"{len(tensors)} tensors, this peer's state has {len(own)}"
        for i, (theirs, mine) in enumerate(zip(tensors, own, strict=True)):
            if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
                return (
                    f"tensor {i} is {theirs.dtype} {list(theirs.shape)}, here {mine.dtype} {list(mine.shape)}"
                )
        return None

    def load_state_from_peers(self, *args, **kwargs):
        loaded = super().load_state_from_peers(*args, **kwargs)
        self.share_loaded_statistics()
        if self.last_download_ok:  # the parameters are the donor's, of the step its metadata says
            self.applied_epoch = None
        return loaded

    def share_loaded_statistics(self) -> None:
        """Put the optimizer's statistics back into the tensors the averaging rounds average, after the
        optimizer loaded a state (a download, a checkpoint).

        With the optimizer offloaded, hivemind averages the optimizer's own statistic tensors, in shared
        memory, in the averager's process. ``torch.optim.Optimizer.load_state_dict`` puts *new* tensors
        in their place, so from a peer's first download on (every peer but the first joins by one) its
        state rounds averaged buffers its optimizer no longer used: the parameters were averaged, Adam's
        moments never again. On the bed the NAT peer, after one gradient round it missed, stood 1e-4 to
        4e-3 from the public peer for the 50 steps that followed, every state round succeeding."""
        if not self.reuse_tensors:
            return  # hivemind copies the statistics in and out of its own buffers at every round
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        with self.get_tensors() as averaged:
            shared = iter(
                averaged[len(parameters) : len(parameters) * (1 + len(self.opt_keys_for_averaging))]
            )
            for key in self.opt_keys_for_averaging:
                for parameter in parameters:
                    buffer, loaded = next(shared), self.optimizer.state[parameter][key]
                    if loaded is not buffer:
                        buffer.copy_(loaded)
                        self.optimizer.state[parameter][key] = buffer


class _CheckedGradientAverager(
    GradientAverager,
    _ThrottledDeclaration,
    PeerRounds,
):
    """hivemind's gradient averager whose rounds say how much of the average arrived, and leave every peer
    with the same averaged gradients to the bit (``allreduce.py``).

    Each peer gathers the global step its gradients are for (``round_data``, set by the optimizer). hivemind
    lets a peer a step behind join the round of the next step (it has just missed the others' transition);
    a group whose peers are further apart does not average (gradients of parameters that far apart do not
    add up), and each steps on its own gradients. On the home-like bed a NAT peer averaged at global step 10
    with a healed peer still at step 5, stepped ahead of the swarm by the healed peer's round, and stayed two
    steps ahead for good (tests/test_faults.py, after the kill)."""

    step_spread = 1
    skipped_is_partial = True
    round_data: Callable[[], dict] | None = None

    def schedule_step(self, scheduled_time=None, **kwargs):
        # every gradient round passes here, pre-scheduled or begun at the step (hivemind's step() calls it)
        if self.round_data is not None:
            kwargs.setdefault("gather", self.round_data())
        return super().schedule_step(scheduled_time, **kwargs)


class BoundedOptimizer(Optimizer):
    """hivemind's Optimizer with the two things Potluck needs changed.

    - ``load_state_from_peers`` gives up after ``load_state_attempts`` (hivemind retries forever, so a
      swarm whose only donor died would hang a newcomer).
    - every gradient-averaging round is reported to a listener, so its outcome reaches the metrics.
    """

    def __init__(
        self,
        *,
        listener,
        load_state_attempts: int,
        wire_bytes: int,
        deadlines,
        **kwargs,
    ):
        self._listener = listener
        averager_opts = kwargs.get("averager_opts") or {}
        self._grad_averager_opts = {k: averager_opts[k] for k in GRADIENT_AVERAGER_OPTS if k in averager_opts}
        self._fewest_others = averager_opts.get("min_group_size", 2) - 1
        self._load_state_attempts = load_state_attempts
        self._wire_bytes = wire_bytes
        self._deadlines = deadlines
        self.last_state_download_ok = False
        self.last_state_download_epoch: int | None = None
        self.last_state_download_donor: str | None = None
        self.stop = StopRequest()
        self._released: list[StepControl] = []
        self.hold = threading.Event()
        """Set (from any thread) while the run is paused or finished: a gradient round that has not found
        its group within ``matchmaking_time`` is called off: its step is not taken and this peer's
        gradients for it are left to the round. Peers learn of a pause a poll apart: one that already holds
        never comes to the round of one that does not know yet, which waited the whole ``averaging_timeout``
        for it (15 s in tests/test_run_status.py), then stepped alone, a step apart from the swarm. Called
        off, both hold at the same step with the same parameters."""
        super().__init__(**kwargs)
        if self.grad_averager is not None:
            self.grad_averager.round_data = lambda: gradient_round_data(self.local_epoch, self.client_mode)
        self.state_averager.record_applied_epochs()
        self.state_averager.alone = self._alone
        self.state_averager.stop = self.stop
        self.state_averager.stopping = self.stop.is_set

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        # Built as the subclass from the start, not swapped in afterwards: the averager's constructor hands
        # a weak reference to *its* get_current_state to the thread that serves state downloads, so a
        # class swapped in later never served a download (newcomers got hivemind's mislabelled state).
        # The arguments are hivemind 1.1.12's Optimizer._make_state_averager's, which names its class.
        return _ObservedStateAverager(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> SwarmAwareTracker:
        # hivemind's tracker counts other peers' samples only as of its last DHT fetch, so fast peers
        # each reach the target alone and global steps overshoot it (see hivemind_ext/tracker.py)
        return SwarmAwareTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            **kwargs,
        )

    def _maybe_schedule_gradient_averaging(self) -> None:
        # Alone, hivemind pre-schedules a matchmaking round every global step only to cancel it at the
        # step (nobody to average with): 5-6 ms of round trips to the averager process per step in
        # bench/overhead.py. When a peer appears, the step starts its round without pre-scheduling.
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_gradient_averaging()

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        # a peer out of step with the swarm (a minority after a partition, about to take the swarm's
        # state) averages with nobody: its gradients are for other parameters, a group must not mix them
        apart = abs(self.local_epoch - self.tracker.global_epoch) > 1
        if apart:
            if self.scheduled_grads is not None and not self.scheduled_grads.done():
                self.scheduled_grads.cancel()
            self.scheduled_grads = None
        if not apart and super()._begin_averaging_gradients(grad_scaler):
            return True
        # hivemind steps on local gradients here and reported no round at all: a peer alone for good
        # counted no "alone" round (issue 16); one whose round could not start counts a failed one
        self._listener.averaging_round(apart or self.tracker.global_progress.num_peers <= 1, 1, 0, 0)
        return False

    def _should_load_state_from_peers(self) -> bool:
        # a client-mode peer more than one step ahead of the public peers (it resumed from a checkpoint
        # newer than theirs, or stepped on before the tracker held it back) takes their state: they
        # define the swarm's step, and hivemind would never make either side catch up
        if self.client_mode and self.tracker.steps_ahead_of_public_peers > 1:
            return True
        if self.state_averager.out_of_step():  # once per such round
            return True
        return super()._should_load_state_from_peers()

    def _make_gradient_averager(self, factory, **kwargs):
        # hivemind forwards averager_opts to the state averager only; the gradient averager needs the
        # same request timeout (shorter than matchmaking, or matchmaking can deadlock) and group size:
        # those of averager_opts (GRADIENT_AVERAGER_OPTS) go to both
        # built as the subclass: its rounds run in the averager's own process, forked at construction
        return super()._make_gradient_averager(_CheckedGradientAverager, **self._grad_averager_opts, **kwargs)

    def load_state_from_peers(self, keep_newer: bool = False, **kwargs):
        """Download the swarm's state (bounded, checked). ``keep_newer``: refuse a state older than this
        peer's own step, as hivemind does (a peer starting from its own checkpoint); otherwise, the
        optimizer's own catch-up, a state within a step of the swarm's is taken whatever this peer's own
        step (see below)."""
        if self.scheduled_grads is not None and not self.scheduled_grads.done():
            self._tag_along_with_zero_weight(self.scheduled_grads)
            self.scheduled_grads = None
        self.state_averager.step(wait_for_delayed_updates=True)
        started, counted = time.perf_counter(), self.state_averager.download_counts()
        self.state_averager.last_download_ok = False
        own_epoch = self.local_epoch
        if own_epoch > self.tracker.global_epoch:
            logger.info(
                f"this peer is at global step {own_epoch}, the swarm at {self.tracker.global_epoch}: "
                "taking the swarm's state (steps taken apart from it do not count)"
            )
        # hivemind refuses a state older than this peer's own step ("Cowardly refusing"). A peer catching
        # up downloads because it is out of step with the swarm (swarm_step, tracker.py), so it takes a
        # state of the swarm's step, a step either side, whatever its own: the minority of a partition
        # that stepped on alone takes it (its steps apart do not count). Older (a joiner's random
        # weights, reached when the newer donors are busy) or newer (the other peers of a minority that
        # stepped on) is not taken. The state this peer serves meanwhile keeps its label (applied_epoch).
        swarm = self.tracker.global_epoch
        if not keep_newer:
            self.state_averager.local_epoch = max(0, min(own_epoch, swarm) - 1)
            self.state_averager.take_steps_up_to(swarm + 1)
        try:
            with self.tracker.pause_updates():
                # NOTE: hivemind's optimizer downloads the gradient averager's state too, and discards it
                # (its last averaged gradients, overwritten before every round): a second copy of the model
                # for nothing, so it is not downloaded here.
                def attempt() -> bool | None:
                    if not keep_newer:
                        # the swarm moves on while this peer downloads, and its tracker's view does not:
                        # each attempt reads the swarm's step anew (a slow link never caught up otherwise)
                        now = self.tracker.swarm_step_now()
                        self.state_averager.take_steps_up_to(
                            max(swarm, now if now is not None else swarm) + 1
                        )
                    self.state_averager.load_state_from_peers(timeout=self.load_state_timeout, **kwargs)
                    return True if self.state_averager.last_download_ok else None

                download_with_retries(
                    attempt,
                    attempts=self._load_state_attempts,
                    donors_left=lambda: other_donors(self.dht, self.state_averager),
                    what="state download",
                    give_up_without_donors=True,
                    stopping=self.stop.is_set,
                )
                if not self.state_averager.last_download_ok:
                    self.state_averager.local_epoch = own_epoch  # nothing was taken: tried again later
                if self.tracker.global_epoch - 1 <= self.local_epoch < self.tracker.global_epoch:
                    self.state_averager.local_epoch = self.tracker.global_epoch
                self.tracker.report_local_progress(local_epoch=self.local_epoch, samples_accumulated=0)
                self.tracker.follow_public_peers()
                if not self.client_mode:
                    self.state_averager.state_sharing_priority = self.local_epoch
                if self.use_gradient_averaging:
                    self.grad_averager.reset_accumulated_grads_()
                    if not self.client_mode:
                        self.grad_averager.state_sharing_priority = self.local_epoch
        finally:
            self.state_averager.take_steps_up_to(None)
            if not self.state_averager.last_download_ok:
                self.state_averager.local_epoch = own_epoch
        self.last_state_download_ok = self.state_averager.last_download_ok
        self.last_state_download_epoch = self.state_averager.last_download_epoch
        self.last_state_download_donor = self.state_averager.last_download_donor
        self._report_download(started, counted)

    def _report_download(self, started: float, counted: tuple[int, int]) -> None:
        """Report the state download that began at ``started`` (``perf_counter``), when the averager's
        ``download_counts()`` were ``counted``."""
        discarded, unvouched = (
            after - before
            for after, before in zip(self.state_averager.download_counts(), counted, strict=True)
        )
        seconds = time.perf_counter() - started
        self._listener.state_download(self.state_averager.last_download_ok, seconds, discarded, unvouched)

    def agree_on_final_state(self) -> Agreement:
        """After the run's last step (and its last state round): agree with the peers that ended the run with
        this one on one state (``agreement.py``), within twice ``averaging_timeout``. A state taken is reported as a
        state download."""

        def take(donors: list[str], metadata: dict) -> bool:
            started, counted = time.perf_counter(), self.state_averager.download_counts()
            self.state_averager.load_state_from_peers(
                timeout=self.load_state_timeout,
                only=donors,
                expected=(metadata.get("epoch"), metadata[MANIFEST_KEY]),
            )
            self._report_download(started, counted)
            return self.state_averager.last_download_ok

        # This peer takes no step any more: its progress record goes (as a leaving peer's does), so the round of a
        # peer still a step behind (it missed a round) finds the others gone after its matchmaking time instead of
        # waiting out its averaging_timeout for them, and reaches the last step while they still wait here for it
        # (bench/equality.py: under load one run of ten ended apart so)
        self.tracker.shutdown()
        averager = self.state_averager
        return agree_on_final_state(
            averager,
            self.local_epoch,
            take=take,
            # (a peer a step behind still takes its last step and its state round, each ended within
            # matchmaking_time once the others have left, then comes here)
            wait=2 * self.averaging_timeout,
            probe_timeout=averager.next_chunk_timeout or averager.request_timeout,
            robust=aggregator_in_use().robust,
            serving=not self.client_mode,
            stopping=self.stop.is_set,
        )

    def release_scheduled_rounds(self) -> None:
        """This peer takes no step for a while, or none again (its run is paused or finished): ``hold``, and
        release the rounds it scheduled ahead for its next global step. A gradient round whose group forms
        waits for this peer's trigger, and the others' all-reduce would wait for its part until they
        dropped it (a failed round for all of them): it is joined with weight 0 (hivemind's own way out of
        a round it cannot contribute to; it leaves this peer's accumulated gradients for its next step).
        Not cancelled: a cancel while a partner is joining left that partner's all-reduce without this
        peer's part (50 % arrived, tests/test_run_status.py). A state round still looking for its group is
        cancelled, as hivemind's shutdown does (joined with weight 0 it would change this peer's
        parameters outside a step); one whose group formed is joined with weight 0. What is joined is
        waited for before the next step (:meth:`wait_for_released_rounds`)."""
        self.hold.set()
        for name in ("scheduled_grads", "scheduled_state"):
            control: StepControl | None = getattr(self, name)
            setattr(self, name, None)
            if control is None or control.done():
                continue
            looking = control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)
            if name == "scheduled_state" and looking:
                control.cancel()
                continue
            if not control.triggered:
                control.weight = 0
                control.allow_allreduce()
            self._released.append(control)

    def wait_for_released_rounds(self) -> None:
        """Wait until the rounds released for a pause or called off (``hold``) have ended: a gradient round
        does not carry its step, and one still looking for its group would meet the others' next round
        with this peer's gradients of an older step. Bounded by ``averaging_timeout`` (a round ends by its
        deadline), cut short after a stop request (then averager shutdown ends them)."""
        deadline = time.monotonic() + self.averaging_timeout
        for control in self._released:
            while not control.done() and time.monotonic() < deadline and not self.stop.expired():
                try:
                    control.result(timeout=ALONE_CHECK_SECONDS)
                except TimeoutError:
                    continue
                except BaseException:  # (it found no group, or the others left it): over all the same
                    break
        self._released = [control for control in self._released if not control.done()]

    def _round_result(self, control: StepControl) -> dict | None:
        """The round's result, waited for up to ``averaging_timeout``; None when, while it still looks
        for its group, no other peer of the run has a progress record any more (they left and withdrew
        them, ``tracker.py``). hivemind waits out the whole timeout for a group that can no longer form.
        After a stop request the round gets ``STOP_GRACE_SECONDS``: with a partner that hung (SIGSTOP)
        a Ctrl-C took 60 s to end the peer (this round's averaging_timeout, then the state round's)."""
        started = time.monotonic()
        deadline = started + self.averaging_timeout
        while True:
            try:
                return control.result(timeout=min(ALONE_CHECK_SECONDS, max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
                if self.stop.expired():
                    if control.stage == AveragingStage.LOOKING_FOR_GROUP:
                        control.cancel()  # (a running all-reduce cannot be: it ends by itself)
                    raise LeftTheRound() from None
                if (
                    self.hold.is_set()
                    and control.stage == AveragingStage.LOOKING_FOR_GROUP
                    and time.monotonic() - started >= self.matchmaking_time
                ):
                    raise RoundCalledOff(control) from None
                if (
                    control.stage == AveragingStage.LOOKING_FOR_GROUP
                    and self._alone(started)
                    and control.cancel()
                ):
                    logger.info(
                        "gradient averaging: every other peer left; stepping alone"
                        if self._fewest_others == 1
                        else f"gradient averaging: fewer than {self._fewest_others} other peers are in the run, "
                        f"too few for a group that averages under the robust rule; stepping alone"
                    )
                    return None

    _alone_checked_at = -math.inf
    _alone_seen = False

    def _alone(self, waiting_since: float) -> bool:
        """Whether the other peers this peer's rounds are for have left: the tracker has seen others,
        and none has a progress record in the DHT any more (they withdrew theirs; the tracker's own view
        is frozen during a global step); under a robust rule, fewer than the others a group needs
        (``min_group_size`` - 1), where matchmaking would wait for a group that cannot form. Asked only of a
        wait that has outlasted ``matchmaking_time`` (a round of live peers has its group by then), so an
        ordinary round reads no DHT; the DHT is read at most every ``ALONE_RECHECK_SECONDS``. Peers that never
        had a record (a round started before any was published) are not taken for gone."""
        if not self.tracker.saw_others or time.monotonic() - waiting_since < self.matchmaking_time:
            return False
        if time.monotonic() >= self._alone_checked_at + ALONE_RECHECK_SECONDS:
            self._alone_checked_at = time.monotonic()
            self._alone_seen = others_with_records(self.tracker, self.dht) < self._fewest_others
        return self._alone_seen

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        averaged = loaded = False
        group_size = 1
        started = time.perf_counter()
        try:
            gathered = None if maybe_step_control is None else self._round_result(maybe_step_control)
            if gathered is None:
                maybe_step_control = None  # no round, or every other peer left while it looked for them
            else:
                group_size = len(group_of(gathered))
                self._load_averaged_gradients_into_optimizer_()
                loaded = True
                # the parts that did not arrive hold this peer's own gradients: its step differs from
                # the others' there (the next state round evens it out); the round counts as failed
                averaged = (arrived := received_fraction(gathered)) == 1.0
                if not averaged:
                    logger.info(f"gradient averaging: only {arrived:.1%} of the average arrived")
        except RoundCalledOff as called_off:
            logger.info("gradient averaging: the run is paused or finished and the round had found no group: "
                        "this global step is not taken")  # fmt: skip
            # Not cancelled (see release_scheduled_rounds): it runs on in the averager, and a partner that did
            # not know of the pause yet may still average with this peer's gradients; its result is not used.
            self._released.append(called_off.control)
            self.scheduled_grads = None
            self.grad_averager.notify_used_averaged_gradients()
            # as after a state download: the next step's gradients start from zero, on these parameters
            self.tracker.report_local_progress(local_epoch=self.local_epoch, samples_accumulated=0)
            raise
        except LeftTheRound:
            logger.info("gradient averaging: leaving before the round ended; this global step is not taken")
            self._listener.averaging_round(False, group_size, 0, 0)
            # hivemind clears it after the step, which is not taken: its shutdown would cancel or
            # trigger the round a second time (InvalidStateError: the peer exited with an error)
            self.scheduled_grads = None
            raise
        except BaseException as e:
            logger.info(f"gradient averaging failed, stepping with local gradients: {e!r}")
        if not loaded:
            self._load_local_gradients_into_optimizer()
        if maybe_step_control is None:  # hivemind knew of no other peer: a step on local gradients
            self._listener.averaging_round(True, 1, 0, 0)
        else:
            # Butterfly all-reduce: each peer sends (g-1)/g of its tensors to reduce and as much back.
            share = 2 * self._wire_bytes * (group_size - 1) // max(group_size, 1) if averaged else 0
            seconds = time.perf_counter() - started  # matchmaking was scheduled ahead: mostly the all-reduce
            self._listener.averaging_round(averaged, group_size, share, share, seconds)
            if averaged and group_size > 1:
                self._deadlines.observe(seconds)
                # a group always holds a public peer (clients host no part), which takes this step too
                self.tracker.stepping_with_public_peers(public_step(gathered))


def restore_learning_rate(optimizer: BoundedOptimizer) -> None:
    """Set the scheduler's learning rate to the optimizer's global step (after a checkpoint load):
    hivemind updates it only at its next step."""
    optimizer.state_averager._update_scheduler()
