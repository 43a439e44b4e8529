"""The training loop shared by every stage: local batch → loss → backward → averaging strategy."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from potluck.peer.averaging.strategy import AveragingStrategy
from potluck.peer.training.data import BatchStream
from potluck.peer.training.metrics import PeerMetrics
from potluck.peer.training.progress import ProgressDisplay
from potluck.peer.training.stages import Stage

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """More batches had a NaN or Inf loss than ``optimizer.max_nonfinite_losses`` allows: the peer stops
    (``run-peer`` exits with 1 and this one line) rather than train on, or average, garbage."""


@dataclass
class TrainResult:
    global_step: int
    local_steps: int
    samples: int
    last_loss: float
    stopped_by_signal: bool
    run_finished: bool = False
    """The run was set to ``finished`` at its coordinator (``gate``) before the last global step."""


class _RateMeter:
    """A rate (amount per second) as the ratio of moving averages of amounts and durations.

    Averaging the two separately, rather than averaging per-step rates, keeps the rare slow steps
    (a global step that waits for the all-reduce) at their true weight in the result."""

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha
        self._amount = self._seconds = 0.0

    def observe(self, amount: float, seconds: float) -> None:
        if seconds <= 0:
            return
        if self._seconds == 0.0:
            self._amount, self._seconds = amount, seconds
        else:
            self._amount = (1 - self.alpha) * self._amount + self.alpha * amount
            self._seconds = (1 - self.alpha) * self._seconds + self.alpha * seconds

    @property
    def rate(self) -> float:
        return self._amount / self._seconds if self._seconds > 0 else 0.0


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        stage: Stage,
        strategy: AveragingStrategy,
        batches: BatchStream,
        device: torch.device,
        max_global_steps: int,
        metrics: PeerMetrics,
        progress: ProgressDisplay,
        stop: threading.Event,
        max_grad_norm: float | None = None,
        on_global_step: Callable[[int], None] | None = None,
        on_first_step: Callable[[], None] | None = None,
        max_nonfinite_losses: int = 0,
        gate: Callable[[], str] | None = None,
    ):
        self.model = model
        self.stage = stage
        self.strategy = strategy
        self.batches = batches
        self.device = device
        self.max_global_steps = max_global_steps
        self.metrics = metrics
        self.progress = progress
        self.stop = stop
        self.max_grad_norm = max_grad_norm
        self.on_global_step = on_global_step or (lambda step: None)
        self.on_first_step = on_first_step or (lambda: None)
        self.max_nonfinite_losses = max_nonfinite_losses
        self.nonfinite_losses = 0
        """Batches skipped because their loss was NaN or Inf."""
        self.gate = gate
        """Asked before every local step whether to take it (``peer/training/pause.RunGate``): ``active``
        (yes), ``finished`` (end the loop), anything else (it held the loop: look at the stop and the
        step count again)."""
        self._params = [p for p in model.parameters() if p.requires_grad]

    def _skip_nonfinite(self, loss: float, local_steps: int) -> None:
        """Count a batch whose loss is NaN or Inf; past ``max_nonfinite_losses`` of them, stop the peer."""
        self.nonfinite_losses += 1
        self.metrics.nonfinite_loss()
        where = f"at local step {local_steps + 1} (global step {self.strategy.global_step})"
        if self.nonfinite_losses > self.max_nonfinite_losses:
            self.strategy.request_stop()  # the peer leaves: rounds still running get seconds, not their timeouts
            raise NonFiniteLossError(
                f"the loss is {loss} {where}: stopping, after {self.nonfinite_losses} such batch(es) "
                f"(optimizer.max_nonfinite_losses is {self.max_nonfinite_losses}); look for a learning rate "
                "that diverges, weights that hold NaN, or rows with nothing to train on"
            )
        logger.warning(
            f"the loss is {loss} {where}: batch skipped ({self.nonfinite_losses} of "
            f"optimizer.max_nonfinite_losses={self.max_nonfinite_losses})"
        )

    def run(self) -> TrainResult:
        local_rate, swarm_rate = _RateMeter(), _RateMeter(alpha=0.3)
        local_steps = samples = 0
        loss_value = float("nan")
        last_global_time = time.perf_counter()
        run_finished = False
        while self.strategy.global_step < self.max_global_steps and not self.stop.is_set():
            if self.gate is not None and (verdict := self.gate()) != "active":
                if verdict == "finished":
                    run_finished = True
                    break
                last_global_time = time.perf_counter()  # a pause is no time of the swarm's steps
                continue
            started = time.perf_counter()
            # non-tensor fields (e.g. the answers of RL prompts) stay on the host
            drawn = self.batches.take(self.strategy.batch_share(self.batches.batch_size))
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in drawn.items()}
            loss = self.stage.loss(self.model, batch)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                # no backward: not one NaN gradient reaches the swarm's average
                self._skip_nonfinite(loss_value, local_steps)
                continue
            loss.backward()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
            batch_size = self.stage.batch_size(batch)
            stepped = self.strategy.step(batch_size)
            self.strategy.zero_grad()
            elapsed = time.perf_counter() - started

            local_steps += 1
            samples += batch_size
            if local_steps == 1:
                self.on_first_step()
            local_rate.observe(batch_size, elapsed)
            self.metrics.local_step(loss_value, batch_size, elapsed, local_rate.rate)
            if self.stage.last_metrics:
                self.metrics.stage_step(self.stage.last_metrics, elapsed)
            progress = self.strategy.progress()
            if stepped:
                now = time.perf_counter()
                # the strategy's samples per global step (DiLoCo: peers x inner steps x batch)
                swarm_rate.observe(progress.target_batch_size, now - last_global_time)
                last_global_time = now
                self.on_global_step(self.strategy.global_step)
            self.metrics.swarm(progress.global_step, progress.peers, swarm_rate.rate)
            remaining = (self.max_global_steps - progress.global_step) * progress.target_batch_size
            eta = remaining / swarm_rate.rate if swarm_rate.rate > 0 else float("nan")
            self.progress.update(
                progress.global_step, loss_value, local_rate.rate, swarm_rate.rate, progress.peers, eta
            )
        self.progress.update(
            self.strategy.global_step,
            loss_value,
            local_rate.rate,
            swarm_rate.rate,
            self.strategy.progress().peers,
            0.0,
            force=True,
        )
        self.progress.close()
        return TrainResult(
            self.strategy.global_step, local_steps, samples, loss_value, self.stop.is_set(), run_finished
        )
