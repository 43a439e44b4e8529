"""DiLoCo-style averaging: many local AdamW steps, then one outer step on averaged pseudo-gradients.

Each peer trains alone for ``averaging.inner_steps`` (H) local steps with its own AdamW (the *inner*
optimizer, stepped on every local batch). Then the peers average their **pseudo-gradient** (global
weights minus local weights) in one all-reduce, and every peer applies the same **outer** step, SGD
with Nesterov momentum (DiLoCo's 0.7 / 0.9 by default), to its copy of the global weights, and copies
the result into the model. One outer step is one global step. Per sample this sends about H times
fewer bytes than per-step gradient averaging, before compression (Douillard et al., 2023).

Why composed from a ``DecentralizedAverager`` and a ``ProgressTracker`` instead of subclassing
hivemind's ``Optimizer``: the Optimizer's epochs end when the swarm's *samples* reach a target, its
state averager averages parameters and optimizer statistics (not pseudo-gradients), and its local
updates mode has no outer optimizer. Bending it into DiLoCo would override most of its step. The two
pieces used here are hivemind's own: the averager's all-reduce (with the spec's compression) averages
the pseudo-gradients, and its state sharing serves the *outer* state (global weights, outer momentum,
outer step) to late joiners; the tracker publishes each peer's round and inner steps in the DHT.

Rounds and consistency
    - Peers at outer step s average only with peers at outer step s: the averager's group key carries
      s (``rounds.round_bits``), so a straggler never mixes an old pseudo-gradient into a newer round.
    - Kept groups: while the last round's group is every peer the tracker counts in this round, a peer that
      has taken H inner steps asks its group's keeper to re-form it without matchmaking (the others'
      check-ins are then the wait for them; ``hivemind_ext/kept_groups.py``). Otherwise, as below.
    - A peer that has taken H inner steps waits until every peer the tracker knows of has taken H, or
      ``averaging_timeout`` passes; then the round starts. Slow peers therefore bound the round. Its
      group search declares a window a ready-poll longer than ``matchmaking_time`` (the others see the last
      peer's "ready" up to a poll late) and ends as soon as every peer the tracker counts has joined
      (``hivemind_ext/expected_groups.py``). The wait is idle: every peer takes exactly H inner steps per
      outer step, as the spec says, unless
      ``averaging.compute_while_waiting`` lets fast peers keep stepping meanwhile (then they take more,
      each peer a different number, and the run is no longer the DiLoCo of the spec).
    - Only a successful round advances the outer step, and only a round whose group holds a strict
      majority of the peers in the round (the tracker's ``peers_in_round``) succeeds: two groups of one
      outer step would each apply a different average, and nothing would bring their global weights
      together again. A peer whose round failed tries again (without another inner step, unless
      ``compute_while_waiting``); a peer that finds the swarm at a later outer step downloads the outer state (bounded
      in attempts, like ``hivemind_ext.optimizer.BoundedOptimizer``) and continues from the global weights. A round looks for
      its group for a few matchmaking times only, and is left to end by itself when the others have
      moved on (cancelling it held hivemind's matchmaking for later rounds). A round that gathered
      different outer steps fails; so does a round for a peer that got only part of the average
      (``rounds.py``), which then catches up like any peer left behind.
    - A peer alone in the run (the tracker sees nobody else) applies its own pseudo-gradient.

Overlap (``averaging.overlap_communication``, on by default)
    The all-reduce of round s runs in the averager's process while the trainer keeps taking inner
    steps. When it completes, the peer applies the outer step and keeps the inner steps taken
    meanwhile: ``local = new global + (local now - local when the round started)``; they count toward
    round s + 1 (a one-round-delayed outer update, as in streaming DiLoCo's overlapping variant). The
    global weights stay identical on all peers; only the local drift differs. On the last outer step
    (``final_global_step``) the model is set to the global weights exactly, so peers end equal.

Lossy codecs (fp16, 8-bit) would leave each peer with a slightly different average in hivemind's
all-reduce (each sender gets back its own compressed ``average - own part``), and the global weights
would drift apart round after round; the averager runs ``consistent_allreduce`` instead, so every peer
decodes the same bytes and the outer state stays identical (``tests/test_diloco.py`` checks it with uint8).

Learning-rate schedule: the inner AdamW follows ``optimizer.lr`` and ``optimizer.schedule`` over inner
steps (``warmup_steps`` counts inner steps, the decay spans ``max_global_steps x inner_steps``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
from hivemind.averaging.control import AveragingStage
from hivemind.compression import CompressionInfo, NoCompression
from hivemind.dht import DHT
from hivemind.utils.timed_storage import get_dht_time

from potluck.hivemind_ext import allreduce as consistent_allreduce
from potluck.hivemind_ext.access import GatedAveraging
from potluck.hivemind_ext.ctrl_c import KeepsCtrlC
from potluck.hivemind_ext.donors import (
    LimitedDonor,
    ServesState,
    StoppableDownloads,
    download_with_retries,
    other_donors,
)
from potluck.hivemind_ext.expected_groups import EXPECT, ExpectedGroups
from potluck.hivemind_ext.followers import PatientFollowers
from potluck.hivemind_ext.kept_groups import KEEP, KeptGroups
from potluck.hivemind_ext.optimizer import StopRequest
from potluck.hivemind_ext.rounds import CheckedRounds, TimedRounds, group_of, received_fraction, round_bits
from potluck.hivemind_ext.tracker import RoundTracker, announce_and_count, own_subkey, published_records
from potluck.peer.averaging.deadlines import DeadlineWatch
from potluck.peer.averaging.gradient import COMPRESSIONS, lr_lambda
from potluck.peer.averaging.strategy import AveragingListener, AveragingStrategy, SwarmProgress, round_phases
from potluck.protocols.runspec import RunSpec

logger = logging.getLogger(__name__)
PROGRESS_REPORT_SECONDS = 5.0
"""Between the start of an outer step and the moment H inner steps are taken, a peer publishes its progress
at most this often (the others' view of its inner steps lags by as much; only the moment it is ready
matters to them, and that is published at once)."""
WAIT_SLICE_SECONDS = 0.05
"""How often an idle peer (H taken, the others not ready) looks again at the swarm's progress and at a stop
request (``READY_POLL_SECONDS`` bounds how fresh that view is)."""
READY_POLL_SECONDS = 0.5
"""How often a ready peer (H taken) reads the swarm's progress while it waits for the others: the tracker's refresh
period, so the last one's "ready" reaches the others up to this late. 0.1 s was tried (2026-12-06): the outer step
looked 0.3 s shorter but within the spread, and in 2 of 4 runs of ``tests/test_diloco.py``'s client-mode pair a
round then split (one peer averaged alone while the other timed out looking for a group), against none in the
sessions before; not kept. ``bench/control_plane.py --runs 3`` compares it (mode ``poll-0.1``)."""
KEEP_GROUPS = True
"""Whether a round asks to re-form the last round's group without matchmaking (``hivemind_ext/kept_groups.py``);
off, every round searches (``bench/control_plane.py`` compares the two)."""
TRACKER_REFRESH_SECONDS = 2.0
"""How often the tracker reads the swarm's progress from the DHT by itself (to see a peer join, leave or move ahead).
hivemind's tracker reads every 0.5 s once the swarm's samples reach its target, which for DiLoCo is most of every
outer step: 8 reads per peer and outer step at 4 peers, each answered by every peer with every record. A peer waiting
for the others' "ready" asks for its own reads, every ``READY_POLL_SECONDS``; a kept group needs none."""
GROUP_SEARCH_MATCHMAKING_TIMES = 4
"""A round looks for its group for this many ``matchmaking_time``s (hivemind needs more than one)."""


FLAT_CODECS = frozenset({"none", "fp16"})
"""Codecs (``averaging.compression``) that code each value alone: the pseudo-gradient is averaged as one flat buffer."""


class _OuterAverager(
    ServesState,
    StoppableDownloads,
    LimitedDonor,
    PatientFollowers,
    GatedAveraging,
    KeptGroups,
    ExpectedGroups,
    TimedRounds,
    CheckedRounds,
    consistent_allreduce.SameAverages,
    KeepsCtrlC,
):
    """All-reduces pseudo-gradients; serves the outer state that ``current_state`` returns to joiners."""


@dataclass
class _Round:
    control: object
    """hivemind's StepControl of the all-reduce running in the background."""
    outer_step: int
    snapshot: list[torch.Tensor] | None
    """Local weights when the round started (overlap): the inner steps taken since are kept."""
    started: float
    """``time.monotonic()`` before the averager was asked for the round: it may form the group (a kept one, at
    once) and record it (``TimedRounds``) before its ``step`` returns, so a reading taken after that came later
    than the group in about 1 of 50 kept rounds, and the round had no phases."""
    inner_steps_since: int = 0
    kept_before: int = 0
    """The averager's kept rounds before this one (``KeptGroups.kept_rounds``)."""


class DiLoCoAveraging(AveragingStrategy):
    def __init__(
        self,
        spec: RunSpec,
        dht: DHT,
        params: list[torch.nn.Parameter],
        listener: AveragingListener,
        final_global_step: int | None = None,
    ):
        averaging, opt = spec.averaging, spec.optimizer
        self._params = list(params)
        self._listener = listener
        self._inner_steps = averaging.inner_steps
        self._overlap = averaging.overlap_communication
        self._compute_while_waiting = averaging.compute_while_waiting
        self._averaging_timeout = averaging.averaging_timeout
        self._deadlines = DeadlineWatch(averaging.averaging_timeout)
        self._round_deadline = 2 * averaging.averaging_timeout + (GROUP_SEARCH_MATCHMAKING_TIMES + 2) * (
            averaging.matchmaking_time
        )
        """Seconds after which a background round that has not ended is abandoned."""
        self._matchmaking_time = averaging.matchmaking_time
        self._min_group = averaging.aggregator.rule().min_group_size
        """The fewest peers an outer round averages (3 under a robust rule, hivemind_ext/rounds.py): with fewer in
        the run a peer applies its own pseudo-gradient. A pair under a robust rule had retried its round, which
        averages nothing, for ever: neither peer took an outer step."""
        self._load_state_timeout = averaging.load_state_timeout
        self._load_state_attempts = averaging.load_state_attempts
        self._final_global_step = final_global_step or spec.max_global_steps
        self._samples_unit = spec.batch.per_peer_batch_size
        self._dht = dht
        self._stop = StopRequest()

        self._inner = torch.optim.AdamW(
            self._params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay
        )
        self._inner_schedule = torch.optim.lr_scheduler.LambdaLR(
            self._inner, lr_lambda(opt.warmup_steps, opt.schedule, spec.max_global_steps * self._inner_steps)
        )
        # the outer state: float32 master copy of the global weights on the CPU, SGD and its momentum
        self._global = [p.detach().to("cpu", torch.float32, copy=True) for p in self._params]
        self._outer = torch.optim.SGD(
            self._global,
            lr=averaging.outer_lr,
            momentum=averaging.outer_momentum,
            nesterov=averaging.nesterov and averaging.outer_momentum > 0,
        )
        # a zero buffer steps exactly like torch's lazily created one, and can be served from step 0
        self._momentum = [torch.zeros_like(g) for g in self._global]
        if averaging.outer_momentum > 0:
            for g, m in zip(self._global, self._momentum, strict=True):
                self._outer.state[g]["momentum_buffer"] = m
        self._outer_step = 0
        self._inner_in_round = 0
        self._ready_since: float | None = None
        self._last_refresh = 0.0
        self._last_report = -float("inf")
        self._round: _Round | None = None
        self._kept_for: int | None = None
        """The outer step whose round last succeeded here, in a group of ``_kept_size`` peers."""
        self._kept_size = 0
        self._state_lock = threading.Lock()  # hivemind's state thread reads while the trainer writes

        compression = COMPRESSIONS[averaging.compression]()
        # One flat buffer under a codec that treats every value alike: hivemind sends, reduces and hands back each
        # tensor's share of a round as parts of their own (a message, a trip through its thread pool and a reducer
        # step each), which made a round of the tiny model's 20 tensors take twice as long as one of a single
        # tensor of the same size. Codecs with a scale per tensor keep one buffer per tensor.
        self._flat = averaging.compression in FLAT_CODECS
        buffers = (
            [torch.zeros(sum(g.numel() for g in self._global))]
            if self._flat
            else [torch.zeros_like(g) for g in self._global]
        )
        # Payload of one full copy of the pseudo-gradient as hivemind serialises it with this codec
        # (8-bit codecs add their lookup tables): the basis of the byte accounting.
        self._payload_bytes = sum(
            compression.compress(b, CompressionInfo.from_tensor(b), allow_inplace=False).ByteSize()
            for b in buffers
        )
        request_timeout = averaging.request_timeout
        self._averager = _OuterAverager(
            buffers,
            dht,
            current_state=self._current_state,
            start=True,
            prefix=f"{spec.run_id}_outer_averager",
            initial_group_bits=round_bits(0),
            min_matchmaking_time=averaging.matchmaking_time,
            target_group_size=averaging.target_group_size,
            min_group_size=self._min_group,  # a leader waits for a group that can average under the rule
            request_timeout=request_timeout,
            allreduce_timeout=averaging.averaging_timeout,
            next_chunk_timeout=averaging.download_chunk_timeout,
            kept_group_wait=averaging.averaging_timeout,  # as long as a ready peer waits for the others
            compression=compression,
            state_compression=NoCompression(),  # joiners need the exact outer state
            donor_slots=averaging.donor_slots,
        )
        self._averager.stopping = self._stop.is_set
        self._tracker = RoundTracker(
            dht,
            spec.run_id,
            self._inner_steps * self._samples_unit,
            client_mode=dht.client_mode,
            min_refresh_period=TRACKER_REFRESH_SECONDS,
            start=True,
        )

    # -- AveragingStrategy ------------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        return self._outer_step

    def step(self, batch_size: int) -> bool:
        self._inner.step()
        self._inner_schedule.step()
        self._inner_in_round += 1
        if self._round is not None:
            self._round.inner_steps_since += 1
        self._report_progress()

        if self._round is not None:
            if self._round.inner_steps_since >= self._inner_steps:
                # H taken toward the next outer step while this round still runs: wait for it
                while not (self._round.control.done() or self._round_overdue()) and self._idle_a_slice():
                    pass
            if self._round.control.done():
                return self._finish_round()
            if self._round_overdue():
                # hivemind bounds matchmaking and each chunk, but a round whose own sender stalls (the
                # quantile codec's pool did, in a forked averager) never ends: training on alone would
                # look like perfect utilisation. One failed round instead, then wait or catch up.
                logger.info(f"outer round {self._round.outer_step} still running after "
                            f"{self._round_deadline:.0f} s: abandoned, training on")  # fmt: skip
                self._round.control.cancel()
                self._round = None
                self._listener.averaging_round(False, 1, 0, 0)
                self._ready_since = None
                return self._catch_up() if self._tracker.global_epoch > self._outer_step else False
            # NOTE: a round still looking for its group after the others finished it without this peer is
            # not cancelled: hivemind 1.1.12's matchmaking outlived the cancel and held the averager's
            # group search for seconds (its log: "Another look_for_group is already in progress"), so a
            # joiner that caught up missed the next round too, and the next, chasing the swarm for minutes
            # (tests/test_diloco.py). The search ends by itself within a few matchmaking times (see
            # _start_round); the round then fails and the peer catches up.
            if self._round.control.stage == AveragingStage.LOOKING_FOR_GROUP:
                self._refresh_swarm_view()  # for the catch-up then
            return False
        while True:
            decision = self._next_move()
            while decision == "wait" and self._idle_a_slice():
                decision = self._next_move()
            if decision == "train":
                return False
            if decision == "catch up":
                return self._catch_up()
            if decision == "alone":
                self._apply_outer([g - p.detach().to("cpu", torch.float32) for g, p in self._local_pairs()])
                why = "alone" if self._min_group <= 2 else f"fewer than {self._min_group} peers in the run"
                logger.info(f"outer step {self._outer_step}: {why}, applied this peer's pseudo-gradient")
                self._listener.averaging_round(True, 1, 0, 0)  # counted as a step taken alone
                return True
            if decision == "wait":
                return False
            self._start_round()
            if self._overlap:
                return False
            if self._finish_round():
                return True
            if self._compute_while_waiting or self._stop.is_set():
                return False
            # H means H: the failed round is retried once the others are ready again, on the same
            # pseudo-gradient (the local weights have not moved), without another inner step

    def _next_move(self) -> str:
        """What a peer with no round in flight does now: ``catch up`` (the swarm is at a later outer step),
        ``train`` (fewer than H inner steps), ``wait`` (the others not ready yet), ``alone`` (nobody else in
        the run, or fewer peers than a round under the run's rule averages) or ``start`` (a round: everyone is
        ready, or ``averaging_timeout`` passed waiting)."""
        if self._tracker.global_epoch > self._outer_step:
            return "catch up"
        if self._inner_in_round < self._inner_steps:
            return "train"
        if self._keeps_group():
            return "start"  # the kept group's check-ins are the wait for the others (hivemind_ext/kept_groups.py)
        if self._ready_since is None:
            self._ready_since = time.monotonic()
            self._refresh_swarm_view()
            return "wait"
        if not self._tracker.fetched_global_progress_this_epoch.is_set():
            return "wait"  # decide on a view of the swarm fetched after this peer became ready
        glob = self._tracker.global_progress
        if glob.num_peers < self._min_group:
            return "alone"
        in_round = max(self._tracker.peers_in_round, 1)
        everyone_ready = glob.samples_accumulated >= in_round * self._inner_steps * self._samples_unit
        if not everyone_ready and time.monotonic() - self._ready_since < self._averaging_timeout:
            self._refresh_swarm_view(READY_POLL_SECONDS)
            return "wait"
        return "start"

    def _keeps_group(self) -> bool:
        """Whether this round asks to re-form the last round's group without matchmaking: that round succeeded
        here, and its group is as many peers as the tracker counts in this round (nobody joined or left)."""
        return (
            KEEP_GROUPS
            and self._kept_for == self._outer_step - 1
            and self._kept_size == self._tracker.peers_in_round
        )

    def _idle_a_slice(self) -> bool:
        """H means H: a peer that may not take another inner step yet idles one slice, counted as time
        spent waiting on the swarm. False (no wait) under ``compute_while_waiting`` or a stop request."""
        if self._compute_while_waiting or self._stop.is_set():
            return False
        time.sleep(WAIT_SLICE_SECONDS)
        self._communication_wait(WAIT_SLICE_SECONDS)
        return True

    def _round_overdue(self) -> bool:
        return time.monotonic() - self._round.started > self._round_deadline

    def request_stop(self) -> None:
        self._stop.set()  # a state download in progress ends (StoppableDownloads); rounds end as they do

    def resume(self) -> None:
        # (a round in flight needs nothing at a pause: it runs without a trigger and ends by itself)
        # the wait for the others' inner steps starts again: the pause counted against averaging_timeout,
        # and the others, paused too, would be given up on at once
        if self._ready_since is not None:
            self._ready_since = time.monotonic()

    def zero_grad(self) -> None:
        self._inner.zero_grad(set_to_none=True)

    def load_state_from_peers(self) -> int | None:
        if self._round is not None:
            self._round.control.cancel()
            self._round = None
        started, counted = time.perf_counter(), self._averager.download_counts()

        def attempt() -> int | None:
            loaded = self._averager.load_state_from_peers(timeout=self._load_state_timeout)
            if loaded is None or (adopted := self._adopt_downloaded(*loaded)) is None:
                return None
            self.last_state_donor = loaded[0].get("donor")
            return adopted

        adopted = download_with_retries(
            attempt,
            attempts=self._load_state_attempts,
            donors_left=lambda: other_donors(self._dht, self._averager),
            what="outer state download",
            give_up_without_donors=False,
            stopping=self._stop.is_set,
        )
        seconds = time.perf_counter() - started
        discarded, unvouched = (
            after - before for after, before in zip(self._averager.download_counts(), counted, strict=True)
        )
        self._listener.state_download(adopted is not None, seconds, discarded, unvouched)
        self._communication_wait(seconds)
        return adopted

    def peers_in_run(self) -> int:
        return announce_and_count(self._tracker, self._dht, fetch=lambda _: self._refresh_swarm_view())

    def progress(self) -> SwarmProgress:
        glob = self._tracker.global_progress
        peers = max(glob.num_peers, 1)
        return SwarmProgress(
            global_step=self._outer_step,
            peers=peers,
            samples_accumulated=glob.samples_accumulated,
            target_batch_size=peers * self._inner_steps * self._samples_unit,
            eta_next_step=max(0.0, glob.eta_next_epoch - get_dht_time())
            if glob.eta_next_epoch
            else float("nan"),
        )

    def state_dict(self) -> dict:
        with self._state_lock:
            return {
                "outer_step": self._outer_step,
                "global_weights": [g.clone() for g in self._global],
                "outer_momentum": [m.clone() for m in self._momentum],
                "inner_optimizer": self._inner.state_dict(),
                "inner_schedule": self._inner_schedule.state_dict(),
            }

    def settle(self) -> None:
        """After the last outer step, stay a donor while another peer is still behind it.

        (The step itself is applied in the foreground: ``_apply_outer``'s ``final``.) A round can end
        complete for one peer and fail for another, one of whose chunks came too late (``rounds.py``);
        that peer catches up by download. When the peers that completed the last round left at once,
        nobody could serve it: it retried until their records expired (a minute), then took the last
        step alone and ended with other weights. Bounded by a round's deadline plus a download's.
        """
        if self._outer_step < self._final_global_step:
            return  # stopped before the end: leave now
        if self._averager.client_mode:
            # Behind NAT this peer serves no state, so nobody's catching up waits on it. And what it would
            # wait on is stale: its DHT node stores no records, so the withdrawal of a partner that left first
            # never reaches it, and the partner's last record but one, cached, said "behind" until it expired
            # (a minute: tests/test_diloco.py's client-mode peer, in a suite run).
            return
        started = time.monotonic()
        deadline = started + self._round_deadline + self._load_state_timeout
        behind, said = self._peers_behind(), False
        while behind and time.monotonic() < deadline:
            if not said and time.monotonic() - started > 2:  # quiet while the others merely publish it
                said = True
                logger.info(f"outer step {self._outer_step} is the last: serving it while {behind} peer(s) "
                            f"catch up (at most {deadline - time.monotonic():.0f} s more)")  # fmt: skip
            time.sleep(0.5)
            behind = self._peers_behind()
        if behind:
            logger.warning(f"leaving with {behind} peer(s) still behind outer step {self._outer_step}")

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint; the model keeps the local weights it was loaded with."""
        self._inner.load_state_dict(state["inner_optimizer"])
        self._inner_schedule.load_state_dict(state["inner_schedule"])
        self._adopt(state["outer_step"], state["global_weights"], state["outer_momentum"], into_model=False)

    def shutdown(self) -> None:
        if self._round is not None:
            self._round.control.cancel()
        self._tracker.shutdown()
        self._averager.shutdown()

    # -- rounds -----------------------------------------------------------------------------------
    def _local_pairs(self):
        return zip(self._global, self._params, strict=True)

    def _per_tensor(self, buffers) -> list[torch.Tensor]:
        """The averager's buffers as one view per global tensor (of its one flat buffer, or its own)."""
        if not self._flat:
            return list(buffers)
        (flat,) = buffers
        pieces = flat.split([g.numel() for g in self._global])
        return [piece.view(g.shape) for piece, g in zip(pieces, self._global, strict=True)]

    def _start_round(self) -> None:
        self._averager.set_group_bits(round_bits(self._outer_step))
        with self._averager.get_tensors() as buffers:
            for buffer, (g, p) in zip(self._per_tensor(buffers), self._local_pairs(), strict=True):
                torch.sub(g, p.detach().to("cpu", torch.float32), out=buffer)
        snapshot = [p.detach().clone() for p in self._params] if self._overlap else None
        keep, kept_before = self._keeps_group(), self._averager.kept_rounds
        gather = {"outer_step": self._outer_step, KEEP: keep}
        # A search: the round starts when the tracker shows everyone ready, and the others see the last one's
        # "ready" up to a poll later (READY_POLL_SECONDS): the leader's window covers that spread, and ends as
        # soon as everyone the tracker counts has joined (hivemind_ext/expected_groups.py). A kept group's
        # members wait for each other at their keeper instead, up to averaging_timeout, and search only if one
        # does not come.
        window = 0.0 if keep else READY_POLL_SECONDS
        if not keep:
            gather[EXPECT] = self._tracker.peers_in_round
        started = time.monotonic()
        control = self._averager.step(
            gather=gather,
            scheduled_time=get_dht_time() + window + self._matchmaking_time,
            timeout=(self._averaging_timeout if keep else window)
            + GROUP_SEARCH_MATCHMAKING_TIMES * self._matchmaking_time,
            # One attempt: hivemind would retry a failed all-reduce on the buffer it had already changed in
            # part. A failed round is retried here, on a fresh pseudo-gradient, once the swarm is ready.
            allow_retries=False,
            wait=False,
        )
        self._round = _Round(control, self._outer_step, snapshot, started, kept_before=kept_before)

    def _finish_round(self) -> bool:
        current, self._round = self._round, None
        waited = time.perf_counter()
        group_size, error = 1, None
        try:
            gathered = current.control.result(timeout=self._averaging_timeout + 5)
            group = group_of(gathered)
            group_size = len(group)
            steps = {data.get("outer_step") if isinstance(data, dict) else None for data in group.values()}
            in_round = self._tracker.peers_in_round
            if steps != {current.outer_step}:
                error = f"group mixed outer steps {sorted(map(str, steps))}"
            elif 2 * group_size <= in_round:
                # two groups of one outer step would each apply their own average: global weights apart for
                # good (4 peers split 2 + 2 in 3 of 6 runs of bench/equality.py); only a majority advances
                error = f"a group of {group_size} is not a majority of the {in_round} peers in this round"
            elif (arrived := received_fraction(gathered)) < 1.0:
                # the rest is this peer's own pseudo-gradient: its outer step would differ from the others'
                error = f"only {arrived:.1%} of the average arrived"
        except BaseException as e:
            error = repr(e)
        self._communication_wait(time.perf_counter() - waited)
        if error is not None:
            self._kept_for = None
            logger.info(f"outer round {current.outer_step} failed, training on: {error}")
            self._listener.averaging_round(False, group_size, 0, 0)
            self._ready_since = None  # wait for the others again (or catch up), then retry
            return False
        with self._averager.get_tensors() as averaged:
            average = [t.clone() for t in self._per_tensor(averaged)]
        # butterfly all-reduce: a peer sends (g-1)/g of its pseudo-gradient and as much of the averaged result
        share = 2 * self._payload_bytes * (group_size - 1) // group_size
        seconds = time.monotonic() - current.started  # matchmaking included: DiLoCo does not schedule ahead
        kept = self._averager.kept_rounds > current.kept_before
        self._deadlines.observe(seconds)
        self._kept_for, self._kept_size = current.outer_step, group_size
        applying = time.monotonic()
        self._apply_outer(average, current.snapshot, current.inner_steps_since)
        phases = round_phases(current.started, *self._averager.last_round_times(), applying, time.monotonic())
        self._listener.averaging_round(True, group_size, share, share, seconds, kept=kept, phases=phases)
        how = " (kept group)" if kept else ""
        logger.info(f"outer step {self._outer_step}: averaged pseudo-gradients of {group_size} peers{how}")
        return True

    def _apply_outer(
        self,
        pseudo_gradient: list[torch.Tensor],
        snapshot: list[torch.Tensor] | None = None,
        carried: int = 0,
    ) -> None:
        with self._state_lock:
            for g, delta in zip(self._global, pseudo_gradient, strict=True):
                g.grad = delta
            self._outer.step()
            for g in self._global:
                g.grad = None
            self._outer_step += 1
        final = self._outer_step >= self._final_global_step
        with torch.no_grad():
            for i, (g, p) in enumerate(self._local_pairs()):
                if snapshot is not None and not final:
                    p.sub_(snapshot[i]).add_(g.to(p.device, p.dtype))  # keep the inner steps taken meanwhile
                else:
                    p.copy_(g)
        self._start_outer_step(self._outer_step, carried if snapshot is not None else 0)

    def _start_outer_step(self, outer_step: int, inner_steps_done: int) -> None:
        self._inner_in_round = inner_steps_done
        self._ready_since = None
        with self._tracker.pause_updates():
            self._tracker.update_epoch(outer_step)
        self._report_progress(now=True)
        if not self._averager.client_mode:  # a peer behind NAT serves no state (hivemind refuses it)
            self._averager.state_sharing_priority = outer_step

    def _catch_up(self) -> bool:
        before = self._outer_step
        downloaded = self.load_state_from_peers()
        if downloaded is None:
            # nobody could serve the state: go on from ours; the tracker will say again if still behind
            logger.warning(f"behind the swarm (outer step {before}) and could not download its state")
            self._tracker.global_progress.epoch = self._outer_step
            return False
        logger.info(f"outer step {downloaded}: loaded the swarm's outer state (was at {before})")
        return self._outer_step != before

    # -- outer state ------------------------------------------------------------------------------
    def _current_state(self) -> tuple[dict, list[torch.Tensor]]:
        with self._state_lock:
            metadata = {"outer_step": self._outer_step, "donor": str(self._dht.peer_id)}
            return metadata, [t.clone() for t in (*self._global, *self._momentum)]

    def _adopt_downloaded(self, metadata, tensors) -> int | None:
        n = len(self._global)
        step = metadata.get("outer_step") if isinstance(metadata, dict) else None
        shapes_match = len(tensors) == 2 * n and all(
            t.shape == g.shape for t, g in zip(tensors, (*self._global, *self._global), strict=True)
        )
        if not isinstance(step, int) or not shapes_match:
            logger.warning(f"ignoring a malformed outer state (outer step {step!r}, {len(tensors)} tensors)")
            return None
        if step < self._outer_step:
            logger.info(f"ignoring an older outer state (outer step {step} < {self._outer_step})")
            return None
        self._adopt(step, tensors[:n], tensors[n:])
        return step

    def _adopt(self, outer_step: int, weights, momentum, into_model: bool = True) -> None:
        with self._state_lock:
            for g, w in zip(self._global, weights, strict=True):
                g.copy_(w)
            for m, w in zip(self._momentum, momentum, strict=True):
                m.copy_(w)
            self._outer_step = outer_step
        if into_model:
            with torch.no_grad():
                for g, p in self._local_pairs():
                    p.copy_(g)
        self._start_outer_step(outer_step, 0)

    # -- bookkeeping ------------------------------------------------------------------------------
    def _report_progress(self, now: bool = False) -> None:
        """Publish this peer's inner steps of the outer step (a signed DHT record): at the start of each
        outer step (``now``), once H are taken (the others start the round on it), and in between at most
        every ``PROGRESS_REPORT_SECONDS``, so that the control plane's traffic grows with time, not with
        steps (a record per inner step was most of the bytes beyond the payload at 4 peers)."""
        # capped at H: the sum over peers then reaches peers x H exactly when everyone is ready
        done = min(self._inner_in_round, self._inner_steps) * self._samples_unit
        published = self._tracker.local_progress
        if not now and (published.epoch, published.samples_accumulated) == (self._outer_step, done):
            return  # nothing new (waiting with H taken)
        ready = done == self._inner_steps * self._samples_unit
        if now or ready or time.monotonic() - self._last_report >= PROGRESS_REPORT_SECONDS:
            self._last_report = time.monotonic()
            self._tracker.report_local_progress(self._outer_step, done)

    def _peers_behind(self) -> int:
        """Peers whose progress record is at an outer step before this peer's."""
        epochs = [
            entry.value.get("epoch")
            for subkey, entry in published_records(self._tracker, self._dht).items()
            if subkey != own_subkey(self._tracker) and isinstance(entry.value, dict)
        ]
        return sum(isinstance(e, int) and e < self._outer_step for e in epochs)

    def _refresh_swarm_view(self, period: float = READY_POLL_SECONDS) -> None:
        """Make the tracker fetch the swarm's progress now rather than at its next refresh (``TRACKER_REFRESH_SECONDS``
        or later), unless this asked for one less than ``period`` seconds ago."""
        if time.monotonic() - self._last_refresh < period:
            return  # one DHT read per refresh period, not one per local step
        self._last_refresh = time.monotonic()
        self._tracker.fetched_global_progress_this_epoch.clear()
        self._tracker.global_progress.next_fetch_time = 0.0
        self._tracker.global_state_updated.set()

    def _communication_wait(self, seconds: float) -> None:
        record = getattr(self._listener, "communication_wait", None)
        if record is not None:
            record(seconds)
