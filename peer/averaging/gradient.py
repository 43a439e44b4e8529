"""Per-step gradient averaging: the default strategy, over hivemind's ``Optimizer``
(``hivemind_ext/optimizer.py`` holds what Potluck changes in it)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
from hivemind.compression import (
    CompressionBase,
    Float16Compression,
    NoCompression,
    Quantile8BitQuantization,
    ScaledFloat16Compression,
    Uniform8BitQuantization,
)
from hivemind.dht import DHT

from potluck.hivemind_ext.agreement import Agreement
from potluck.hivemind_ext.optimizer import (
    BoundedOptimizer,
    LeftTheRound,
    RoundCalledOff,
    restore_learning_rate,
)
from potluck.hivemind_ext.tracker import announce_and_count
from potluck.peer.averaging.deadlines import DeadlineWatch
from potluck.peer.averaging.strategy import AveragingListener, AveragingStrategy, SwarmProgress
from potluck.protocols.runspec import RunSpec

logger = logging.getLogger(__name__)

COMPRESSIONS: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "scaled_fp16": ScaledFloat16Compression,
    "uint8": Uniform8BitQuantization,
    "quantile_8bit": Quantile8BitQuantization,
}
# Bytes per element on the wire for each codec (8-bit codecs add a small lookup table per tensor).
WIRE_BYTES_PER_ELEMENT = {"none": 4, "fp16": 2, "scaled_fp16": 2, "uint8": 1, "quantile_8bit": 1}


ADAM_STATISTICS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-parameter state averaged with the parameters (its ``step`` counts global steps alike)."""


def adamw_with_state(params, opt) -> torch.optim.AdamW:
    """torch's AdamW with its state already created, as it would be before its first step.

    hivemind averages and shares the optimizer's state tensors, so they must exist from the start; when
    they do not, it creates them with a virtual step on zero gradients, which counts as Adam's first step
    (the bias correction then runs one step ahead: the first real update is 0.74x torch's) and applies
    weight decay once. A 1-peer swarm then drifts from torch's AdamW on the same batches (4e-3 after 6
    steps); with the state made here it follows it exactly (tests/test_averaging.py)."""
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
    return optimizer


def lr_lambda(warmup_steps: int, schedule: str, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


class GradientAveraging(AveragingStrategy):
    """Per-step gradient averaging with ``hivemind.Optimizer``.

    Peers accumulate gradients until the swarm together holds ``target_batch_size`` samples, average
    them in one all-reduce and apply the same optimizer step, so peers that started equal stay equal.
    Parameters and optimizer statistics are also averaged every ``average_state_every`` steps to undo
    drift from rounds that a peer missed.
    """

    def __init__(
        self, spec: RunSpec, dht: DHT, params: list[torch.nn.Parameter], listener: AveragingListener
    ):
        opt = spec.optimizer
        averaging = spec.averaging
        compression = COMPRESSIONS[averaging.compression]()
        numel = sum(p.numel() for p in params)
        self._optimizer = BoundedOptimizer(
            listener=listener,
            load_state_attempts=averaging.load_state_attempts,
            wire_bytes=numel * WIRE_BYTES_PER_ELEMENT[averaging.compression],
            deadlines=DeadlineWatch(averaging.averaging_timeout),
            dht=dht,
            # hivemind 1.1.12 inverts this default: left None, a client-mode peer (behind NAT) crashes
            # at its first global step because the optimizer and its averagers disagree
            client_mode=dht.client_mode,
            run_id=spec.run_id,
            target_batch_size=spec.batch.target_batch_size,
            batch_size_per_step=spec.batch.per_peer_batch_size,
            params=params,
            optimizer=lambda p: adamw_with_state(p, opt),
            scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
                o, lr_lambda(opt.warmup_steps, opt.schedule, spec.max_global_steps)
            ),
            matchmaking_time=averaging.matchmaking_time,
            averaging_timeout=averaging.averaging_timeout,
            # hivemind's default is matchmaking_time (0.5-2 s): a peer whose next chunk is later than that
            # is dropped from the round, so a loaded machine or a slow home link turns into partial
            # all-reduces (tests/test_faults.py saw "received 50.8% results"). A dead peer is still
            # dropped, just later; the round as a whole stays bounded by averaging_timeout.
            next_chunk_timeout=max(averaging.matchmaking_time, averaging.averaging_timeout / 4),
            load_state_timeout=averaging.load_state_timeout,
            average_state_every=averaging.average_state_every,
            # hivemind averages only the parameters unless told which optimizer statistics to include.
            # Adam's moments then stay apart after one round that a peer missed or got in part, and every
            # later update differs by about the learning rate: on the shaped 3-peer bed, peers re-averaged
            # every step stayed 4e-3 apart for 50 steps (tests/test_faults.py, heal phase).
            average_opt_statistics=ADAM_STATISTICS,
            grad_compression=compression,
            state_averaging_compression=compression,
            # NOTE: bench/overhead.py measured offload_optimizer=True/False and delay_optimizer_step
            # within noise of each other (docs/benchmarks.md); offloading keeps the update off the
            # model's own storage. reuse_grad_buffers=True is incompatible with per-step zero_grad.
            offload_optimizer=True,
            reuse_grad_buffers=False,
            delay_state_averaging=True,
            # hivemind warns (matchmaking can deadlock) unless requests time out before matchmaking ends
            averager_opts={
                "request_timeout": averaging.request_timeout,
                "donor_slots": averaging.donor_slots,
                "target_group_size": averaging.target_group_size,
                # under a robust rule a group of 2 does not average: its leader waits for a third instead of
                # assembling it (4 trimmed_mean peers on loopback failed 7-23 of ~35 rounds in pairs, and the
                # peers that stepped alone drifted apart, so their states no longer vouched for each other)
                "min_group_size": averaging.aggregator.rule().min_group_size,
            },
            verbose=False,
        )

    @property
    def global_step(self) -> int:
        return self._optimizer.local_epoch

    def load_state_from_peers(self) -> int | None:
        # before the first step: a peer resumed from a checkpoint newer than the donors' keeps its own
        self._optimizer.load_state_from_peers(keep_newer=True)
        self.last_state_donor = self._optimizer.last_state_download_donor
        return self._optimizer.last_state_download_epoch if self._optimizer.last_state_download_ok else None

    def peers_in_run(self) -> int:
        return announce_and_count(self._optimizer.tracker, self._optimizer.dht)

    def step(self, batch_size: int) -> bool:
        before = self._optimizer.local_epoch
        try:
            self._optimizer.step(batch_size=batch_size)
        except (LeftTheRound, RoundCalledOff):  # stopping, or holding: the step's round had not ended,
            return False  # so the step is not taken
        return self._optimizer.local_epoch != before

    def batch_share(self, full: int) -> int:
        return self._optimizer.tracker.batch_share(full)

    def request_stop(self) -> None:
        self._optimizer.stop.set()

    def request_hold(self, held: bool) -> None:
        if held:
            self._optimizer.hold.set()
        else:
            self._optimizer.hold.clear()

    def pause(self) -> None:
        self._optimizer.release_scheduled_rounds()

    def resume(self) -> None:
        self._optimizer.wait_for_released_rounds()
        self._optimizer.hold.clear()
        # hivemind's rate is samples over the time since the last batch: the pause would count as one slow
        # batch, and this peer's share of the next steps (step_share) would shrink for a while
        self._optimizer.tracker.performance_ema.reset_timer()

    def zero_grad(self) -> None:
        self._optimizer.zero_grad(set_to_none=True)

    def progress(self) -> SwarmProgress:
        tracker = self._optimizer.tracker
        glob = tracker.global_progress
        return SwarmProgress(
            global_step=self.global_step,
            peers=max(glob.num_peers, 1),
            samples_accumulated=glob.samples_accumulated,
            target_batch_size=glob.target_batch_size,
            eta_next_step=max(0.0, glob.eta_next_epoch - time.time())
            if glob.eta_next_epoch
            else float("nan"),
        )

    def state_dict(self) -> dict:
        return self._optimizer.state_dict()

    def settle(self) -> Agreement | None:
        # The step's state round runs in the background and reaches the model's parameters at the next
        # step. After the last step the peers' checkpoints held their parameters from before the swarm's
        # last average while their optimizer statistics were after it: two peers ended 3e-3 apart.
        # (Checkpoints during the run stay as they were, the state after the step's update: the state a
        # donor serves a newcomer at that step.)
        self._optimizer.wait_for_released_rounds()  # (a finished run's: leaving, it waits seconds)
        self._optimizer.state_averager.step(wait_for_delayed_updates=True)
        if self._optimizer.stop.is_set():
            return None  # (a peer asked to leave does not wait for the others)
        return self._optimizer.agree_on_final_state()

    def load_state_dict(self, state: dict) -> None:
        self._optimizer.load_state_dict(state)
        averager, tracker = self._optimizer.state_averager, self._optimizer.tracker
        averager.share_loaded_statistics()
        restore_learning_rate(self._optimizer)
        averager.applied_epoch = None  # the parameters are the checkpoint's, of its global step
        # Tell the tracker too: until it would next fetch from the DHT (up to 10 s) it counts samples
        # only toward the epoch it believes in, and would keep accumulating far past the target batch.
        with tracker.pause_updates():
            tracker.update_epoch(new_epoch=self._optimizer.local_epoch)

    def shutdown(self) -> None:
        self._optimizer.shutdown()
