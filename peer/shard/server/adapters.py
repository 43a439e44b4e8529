"""Trainable LoRA adapters inside a served span, trained by the gradients clients send back and
averaged with the other replicas of the same span.

A run whose spec asks for a ``lora`` adapter gets it on the servers, not on the client: every server
wraps its blocks' ``target_modules`` with LoRA (initialised under the run's seed, so replicas start
equal), and each backward request applies one AdamW step (the run's ``optimizer``) to the adapter.
Replicas of a span drift apart while clients spread over them; a hivemind averager per span
(``<run_id>_span<start>-<end>_lora``) averages their adapters every ``average_every`` seconds
(Petals could only serve frozen, pre-loaded adapters: its issue #322).

NOTE: backward recomputes the forward pass with the adapter as it is at that moment; if another
client's step landed between a client's forward and backward, its gradient is slightly stale (as
with asynchronous SGD).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import TimeoutError as FutureTimeout

import torch
from hivemind.dht import DHT
from peft import LoraConfig, inject_adapter_in_model

from potluck.hivemind_ext.allreduce import SameAverages
from potluck.hivemind_ext.ctrl_c import KeepsCtrlC
from potluck.peer.shard.blocks import BlockSpan
from potluck.protocols.runspec import LoraAdapter, RunSpec
from potluck.runtime.periodic import Periodic

logger = logging.getLogger(__name__)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SpanAdapter:
    """The span's LoRA tensors and their optimizer. ``lock`` guards them: the compute thread holds it
    for every pass and step, the averaging thread while it copies them in and out."""

    def __init__(self, span: BlockSpan, adapter: LoraAdapter, spec: RunSpec):
        targets = ALL_LINEAR if adapter.target_modules == "all-linear" else list(adapter.target_modules)
        config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=0.0, target_modules=targets)
        torch.manual_seed(spec.seed * 7919 + span.start)  # equal on every replica of this span
        inject_adapter_in_model(config, span)
        self.named = sorted((n, p) for n, p in span.named_parameters() if "lora_" in n)
        for _, parameter in self.named:
            parameter.requires_grad_(True)
        self.parameters = [p for _, p in self.named]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=spec.optimizer.lr, weight_decay=spec.optimizer.weight_decay
        )
        self.lock = threading.Lock()
        self.steps = 0

    def step(self) -> None:
        """Apply the accumulated gradients (call with ``lock`` held, after backward)."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def tensors(self) -> list[torch.Tensor]:
        with self.lock:
            return [p.detach().clone() for p in self.parameters]


class _ReplicaAverager(SameAverages, KeepsCtrlC):
    """Replicas hold the same average to the bit and refuse NaN parts, as every averager of a peer."""


class ReplicaAveraging:
    """Averages a :class:`SpanAdapter` with the other replicas of its span in a background thread.

    Create it in the main thread of the server process (hivemind's averager requirement). Tune ``average_every``
    down for replicas that should stay close, up to save bandwidth; the run's
    ``averaging.matchmaking_time`` and ``averaging_timeout`` bound each round."""

    def __init__(
        self, dht: DHT, adapter: SpanAdapter, spec: RunSpec, span: tuple[int, int], average_every: float
    ):
        self.adapter, self.average_every = adapter, average_every
        self.timeout = spec.averaging.averaging_timeout
        self.averager = _ReplicaAverager(
            [p.detach().clone() for p in adapter.parameters],
            dht,
            start=True,
            prefix=f"{spec.run_id}_span{span[0]}-{span[1]}_lora",
            min_matchmaking_time=spec.averaging.matchmaking_time,
            target_group_size=spec.averaging.target_group_size,
            request_timeout=spec.averaging.request_timeout,
            allreduce_timeout=self.timeout,
        )
        self.rounds = 0
        self._periodic = Periodic(self.average_once, average_every, "span-lora-averaging")

    def start(self) -> ReplicaAveraging:
        self._periodic.start()
        return self

    def average_once(self) -> bool:
        """One round; the adapter moves by (average − what it sent), so steps taken during the round
        are kept. True if a group was found and averaged."""
        with self.adapter.lock, self.averager.get_tensors() as shared:
            sent = [p.detach().clone() for p in self.adapter.parameters]
            for target, value in zip(shared, sent, strict=True):
                target.copy_(value)
        try:
            result = self._result_unless_stopping(
                self.averager.step(timeout=self.timeout, allow_retries=False, wait=False)
            )
        except Exception as e:  # noqa: BLE001 (a failed round leaves the adapter as it was)
            logger.info(f"span adapter averaging failed: {e!r}")
            return False
        if result is None:
            return False
        with self.adapter.lock, self.averager.get_tensors() as shared:
            for parameter, averaged, value in zip(self.adapter.parameters, shared, sent, strict=True):
                parameter.data.add_(averaged - value)
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
