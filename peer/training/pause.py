"""Obeying the run's status between local steps: hold while the run is paused, end when it is finished.

A paused peer stays in the swarm: its DHT node, route keeper, report publisher and averagers keep running,
so newcomers can still download the state from it and the coordinator still sees its reports. It only
takes no local step, so it adds no samples and no global step is taken. Peers learn of a pause up to a
poll apart (``peer/net/run_status.POLL_SECONDS``), so a pause must not leave one peer waiting in a round
for another that already holds:

- the status is looked at between local steps: a round whose group has formed is finished first;
- a round this peer is in that has found no group when it learns of the pause is called off, its step
  not taken (``AveragingStrategy.request_hold``, from the watch's thread);
- the rounds it scheduled ahead for its next step are released when it holds (``AveragingStrategy.pause``).

On ``finished`` the peer leaves as on a signal, at the step it holds; peers may end a step apart.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from potluck.peer.averaging.strategy import AveragingStrategy
from potluck.peer.results import PeerResults
from potluck.peer.training.metrics import PeerMetrics

HOLD_CHECK_SECONDS = 0.25
"""While paused, how often the status and the stop request are looked at (a signal ends the hold within this)."""


class RunGate:
    """Called by the training loop before every local step (``Trainer(gate=...)``); returns

    - ``active``: take the step;
    - ``resumed``: the run was paused and is active again (the time held is not the loop's);
    - ``stopped``: a signal came while the run was paused (the loop ends as on any signal);
    - ``finished``: the run is finished at its coordinator: the loop ends, and the peer saves and leaves.
    """

    def __init__(
        self,
        run_id: str,
        status: Callable[[], str],
        strategy: AveragingStrategy,
        results: PeerResults,
        metrics: PeerMetrics,
        stop: threading.Event,
    ):
        self.run_id = run_id
        self.status = status
        """The run's latest known status (``peer/net/run_status.RunStatusWatch.status``)."""
        self.strategy = strategy
        self.results = results
        self.metrics = metrics
        self.stop = stop

    def __call__(self) -> str:
        status = self.status()
        if status == "paused":
            status = self._hold()
        if status == "finished":
            # leaving, as on a signal: nothing it scheduled may hold the others, and what it waits for
            # on the swarm gets seconds (peers leave a step apart: the one that left is not coming)
            self.strategy.pause()
            self.strategy.request_stop()
            step = self.strategy.global_step
            self._say(f"is finished at its coordinator: leaving at global step {step}")
            self.results.run_status("finished", step)
        return status

    def _hold(self) -> str:
        step = self.strategy.global_step
        self._say(f"is paused at its coordinator: holding at global step {step} (still in the swarm)")
        self.results.run_status("paused", step)
        self.metrics.run_paused(True)
        started = time.monotonic()
        self.strategy.pause()
        while self.status() == "paused" and not self.stop.is_set():
            self.stop.wait(HOLD_CHECK_SECONDS)
        held = time.monotonic() - started
        self.metrics.run_paused(False, held)
        if self.stop.is_set():
            return "stopped"
        if self.status() == "finished":
            return "finished"
        self.strategy.resume()
        step = self.strategy.global_step
        self._say(f"is active again: resuming at global step {step} after {held:.0f}s paused")
        self.results.run_status("active", step, paused_seconds=held)
        return "resumed"

    def _say(self, what: str) -> None:
        print(f"run-peer: run {self.run_id!r} {what}", file=sys.stderr, flush=True)
