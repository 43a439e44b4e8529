"""Trainable LoRA adapters inside a served span, trained by the gradients clients send back, averaged with
the other replicas of the same span, and handed to a replica that joins late.

A run whose spec asks for a ``lora`` adapter gets it on the servers, not on the client: every server
wraps its blocks' ``target_modules`` with LoRA (initialised under the run's seed, so replicas start
equal). Its optimizer policy is the spec's (``span_adapter`` and ``optimizer``, see
``protocols/runspec.SpanAdapterSpec``): the adapter gradients of ``span_adapter.accumulate_backwards``
backward requests are averaged into one AdamW step (a *span step*), with the run's learning rate, warm-up
and schedule counted in span steps, and the gradient clipped to ``optimizer.max_grad_norm`` if set.

Replicas of a span drift apart while clients spread over them; a hivemind averager per span
(``<run_id>_span<start>-<end>_lora``) averages their adapters and AdamW statistics (as a trainers' state
round does) at every multiple of ``span_adapter.average_every`` seconds of DHT time, the clock all peers
share, so every replica enters the same round (Petals could only serve frozen, pre-loaded adapters: its
issue #322). The same averager serves the adapter, its statistics and its span step count to a replica
that joins late: it downloads them (bounded, checked against the donor's manifest:
``hivemind_ext/donors.py``) before it serves. Checkpoints: ``span_checkpoint.py``.

NOTE: backward recomputes the forward pass with the adapter as it is at that moment; if another
client's step landed between a client's forward and backward, its gradient is slightly stale (as
with asynchronous SGD). Gradients accumulated toward the next span step are not part of the state that is
averaged, served or checkpointed: a restart loses at most ``accumulate_backwards - 1`` requests' worth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch
from hivemind.dht import DHT
from hivemind.utils.timed_storage import get_dht_time
from peft import LoraConfig, inject_adapter_in_model

from potluck.hivemind_ext.donors import (
    LimitedDonor,
    ServesState,
    StoppableDownloads,
    download_with_retries,
    other_donors,
)
from potluck.hivemind_ext.layers import PeerRounds
from potluck.hivemind_ext.rounds import received_fraction
from potluck.peer.shard.blocks import BlockSpan
from potluck.peer.shard.server.steps import ServerSteps, StateMismatch
from potluck.protocols.runspec import LoraAdapter, RunSpec
from potluck.runtime.periodic import Periodic

logger = logging.getLogger(__name__)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SpanAdapter(ServerSteps):
    """The span's LoRA tensors, their AdamW and its schedule. ``lock`` guards them: the compute thread holds it
    for every pass and step, the averaging thread while it copies them in and out, a donor while it reads them.
    """

    def __init__(self, span: BlockSpan, adapter: LoraAdapter, spec: RunSpec):
        targets = ALL_LINEAR if adapter.target_modules == "all-linear" else list(adapter.target_modules)
        config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=0.0, target_modules=targets)
        torch.manual_seed(spec.seed * 7919 + span.start)  # equal on every replica of this span
        inject_adapter_in_model(config, span)
        self.named = sorted((n, p) for n, p in span.named_parameters() if "lora_" in n)
        for _, parameter in self.named:
            parameter.requires_grad_(True)
        self.names = [n for n, _ in self.named]
        super().__init__(
            [p for _, p in self.named], spec, spec.span_adapter.accumulate_backwards, "span adapter"
        )

    def tensors(self) -> list[torch.Tensor]:
        with self.lock:
            return [p.detach().clone() for p in self.parameters]


class _ReplicaAverager(
    ServesState,
    StoppableDownloads,
    LimitedDonor,
    PeerRounds,
):
    """Replicas hold the same average to the bit and refuse NaN parts, as every averager of a peer, and a group too
    small to outvote the run's attackers does not average (``rounds.CheckedRounds``); the adapter's state is served
    to late replicas, checked, a few at a time."""


@dataclass(frozen=True)
class Downloaded:
    """A span adapter state downloaded from another replica before serving."""

    steps: int
    """The donor's span step."""
    donor: str | None
    adopted: bool
    """False when this server's own state (resumed from its checkpoint) was further on and was kept."""


class ReplicaAveraging:
    """Averages a :class:`SpanAdapter` with the other replicas of its span in a background thread, and serves
    its state to replicas that join late.

    Create it in the main thread of the server process (hivemind's averager requirement), call
    :meth:`load_state_from_peers` before serving, then :meth:`start`. Rounds start at multiples of
    ``span_adapter.average_every`` seconds of DHT time; the run's ``averaging.matchmaking_time`` and
    ``averaging_timeout`` bound each, ``load_state_timeout`` and ``load_state_attempts`` the download."""

    def __init__(self, dht: DHT, adapter: SpanAdapter, spec: RunSpec, span: tuple[int, int]):
        self.adapter, self.dht, self.span = adapter, dht, span
        averaging = spec.averaging
        self.timeout = averaging.averaging_timeout
        self.load_state_timeout, self.load_state_attempts = (
            averaging.load_state_timeout,
            averaging.load_state_attempts,
        )
        with adapter.lock:
            initial = [t.detach().clone() for t in adapter.state_tensors()]
        self.averager = _ReplicaAverager(
            initial,
            dht,
            current_state=self._current_state,
            start=True,
            prefix=f"{spec.run_id}_span{span[0]}-{span[1]}_lora",
            min_matchmaking_time=averaging.matchmaking_time,
            target_group_size=averaging.target_group_size,
            min_group_size=averaging.aggregator.rule().min_group_size,  # a group that averages under the rule
            request_timeout=averaging.request_timeout,
            allreduce_timeout=self.timeout,
            next_chunk_timeout=averaging.download_chunk_timeout,
            donor_slots=averaging.donor_slots,
        )
        self.rounds = 0
        self._synced_at = adapter.steps
        """The span step of this replica's state when it last took an average or a downloaded state (or started):
        its weight in a round under the mean is the steps taken since."""
        self._weighted = not averaging.aggregator.rule().robust
        self._periodic = Periodic(
            self.average_once, spec.span_adapter.average_every, "span-lora-averaging", aligned_to=get_dht_time
        )
        self.averager.stopping = self._periodic.stopping.is_set

    def start(self) -> ReplicaAveraging:
        self._periodic.start()
        return self

    def load_state_from_peers(self, stopping: Callable[[], bool]) -> Downloaded | None:
        """Download the adapter state of the replica furthest on, if any other replica offers one, and take it
        unless this adapter's own is further on (resumed from a newer checkpoint). None: no replica offered a
        usable state (the first server of its span), or ``stopping()``."""
        self.averager.stopping = lambda: stopping() or self._periodic.stopping.is_set()

        def attempt() -> Downloaded | None:
            loaded = self.averager.load_state_from_peers(timeout=self.load_state_timeout)
            if loaded is None:
                return None
            metadata, tensors = loaded
            steps, donor = metadata.get("steps"), metadata.get("donor")
            if not isinstance(steps, int) or steps < 0:
                logger.warning(f"ignoring a span adapter state without a step count (from {donor})")
                return None
            with self.adapter.lock:
                if steps < self.adapter.steps:
                    return Downloaded(steps, donor, adopted=False)
                try:
                    self.adapter.adopt(tensors, steps, f"the state from {donor}")
                except StateMismatch as e:  # another run's spec under the same run id: try another donor
                    logger.warning(str(e))
                    return None
                self._synced_at = steps
            self._offer_state()
            return Downloaded(steps, donor, adopted=True)

        return download_with_retries(
            attempt,
            attempts=self.load_state_attempts,
            donors_left=lambda: other_donors(self.dht, self.averager),
            what="span adapter download",
            give_up_without_donors=True,
            stopping=stopping,
        )

    def _current_state(self) -> tuple[dict, list[torch.Tensor]]:
        with self.adapter.lock:
            tensors, steps = self.adapter.snapshot()
        metadata = {"steps": steps, "donor": str(self.dht.peer_id), "span": list(self.span)}
        return metadata, tensors

    def _offer_state(self) -> None:
        """Declare this replica's span step as its donor priority: late joiners download from the furthest on."""
        if not self.averager.client_mode:  # a server behind NAT serves no state (hivemind refuses it)
            self.averager.state_sharing_priority = self.adapter.steps

    def average_once(self) -> bool:
        """One round; the state moves by (average − what it sent), so steps taken during the round
        are kept. True if a group was found and averaged.

        Each replica weighs in with the span steps it took since its state was last the swarm's (its last
        averaged round, its download, or its start), as trainers weigh in with their samples: clients routed
        to one replica (the router prefers the fastest) leave the others idle, and equal weights pulled the
        trained adapter halfway back to an idle one's every round (measured: held-out loss 2.91 through the
        trained replica, 3.16 after it averaged with one a step on). An idle replica (weight 0) takes the
        others' average; where every replica is idle they count one each (``Aggregator.combine``). Under a
        robust rule every replica's state is one vote (weight 1), idle or not: a weight of 0 would not vote,
        and a malicious replica claiming steps would outvote idle honest ones."""
        self._offer_state()
        with self.adapter.lock, self.averager.get_tensors() as shared:
            sent, sent_at = self.adapter.snapshot()
            for target, value in zip(shared, sent, strict=True):
                target.copy_(value)
        try:
            result = self._result_unless_stopping(
                self.averager.step(
                    weight=float(sent_at - self._synced_at) if self._weighted else 1.0,
                    timeout=self.timeout,
                    allow_retries=False,
                    wait=False,
                )
            )
        except Exception as e:  # noqa: BLE001 (a failed round leaves the adapter as it was)
            logger.info(f"span adapter averaging failed: {e!r}")
            return False
        if result is None or received_fraction(result) == 0.0:
            return False  # (none of the average arrived: a group too small for a robust rule, or parts lost)
        with self.adapter.lock, self.averager.get_tensors() as shared:
            self.adapter.move_to(list(shared), sent, sent_at)
        self._synced_at = sent_at  # steps taken during the round are this replica's own until the next
        self.rounds += 1
        return True

    def _result_unless_stopping(self, control):
        """The round's result, or None once the server stops: the averager, shut down meanwhile, never
        answers a round it had started (a lone replica's SIGTERM waited out the 15 s join of this thread
        with its round in matchmaking)."""
        while True:
            try:
                return control.result(timeout=0.5)
            except FutureTimeout:
                if self._periodic.stopping.is_set():
                    return None

    def shutdown(self) -> None:
        self._periodic.stopping.set()
        self.averager.shutdown()  # first: a round in progress then fails at once instead of timing out
        self._periodic.stop()
