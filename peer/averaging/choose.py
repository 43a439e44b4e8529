"""Which averaging strategy a run uses (``averaging.strategy`` in the spec), and its accounting."""

from __future__ import annotations

import logging
import time

import torch
from hivemind.dht import DHT

from potluck.hivemind_ext import codecs
from potluck.hivemind_ext.agreement import Agreement
from potluck.hivemind_ext.allreduce import aggregate_with
from potluck.peer.averaging.deadlines import check_deadline_fits
from potluck.peer.averaging.diloco import DiLoCoAveraging
from potluck.peer.averaging.gradient import WIRE_BYTES_PER_ELEMENT, GradientAveraging
from potluck.peer.averaging.strategy import AveragingListener, AveragingStrategy, SwarmProgress
from potluck.protocols.runspec import RunSpec

logger = logging.getLogger(__name__)


class _Accounted(AveragingStrategy):
    """A strategy plus what the metrics need from outside it: the time gradient averaging blocks the
    loop, and this peer's totals logged when it leaves (for its user: scripts read the same counters in
    the ``--results`` summary, see ``peer/results.py``).

    NOTE: hivemind's Optimizer runs the all-reduce and the optimizer step inside ``step()`` on a global
    step without saying how long each took: the whole call counts as waiting on the swarm
    (``time_global_steps``). For the tiny model the optimizer step is a small share of it; for large
    models it overstates the wait. DiLoCo reports its own waits.
    """

    def __init__(self, inner: AveragingStrategy, listener: AveragingListener, time_global_steps: bool):
        self.inner = inner
        self._listener = listener
        self._time_global_steps = time_global_steps

    @property
    def global_step(self) -> int:
        return self.inner.global_step

    def step(self, batch_size: int) -> bool:
        started = time.perf_counter()
        stepped = self.inner.step(batch_size)
        record = getattr(self._listener, "communication_wait", None)
        if stepped and self._time_global_steps and record is not None:
            record(time.perf_counter() - started)
        return stepped

    def load_state_from_peers(self) -> int | None:
        downloaded = self.inner.load_state_from_peers()
        self.last_state_donor = self.inner.last_state_donor
        return downloaded

    def peers_in_run(self) -> int:
        return self.inner.peers_in_run()

    def batch_share(self, full: int) -> int:
        return self.inner.batch_share(full)

    def request_stop(self) -> None:
        self.inner.request_stop()

    def request_hold(self, held: bool) -> None:
        self.inner.request_hold(held)

    def pause(self) -> None:
        self.inner.pause()

    def resume(self) -> None:
        self.inner.resume()

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def progress(self) -> SwarmProgress:
        return self.inner.progress()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def settle(self) -> Agreement | None:
        return self.inner.settle()

    def shutdown(self) -> None:
        self.inner.shutdown()
        latest = getattr(self._listener, "latest", None)
        if isinstance(latest, dict) and "bytes_sent" in latest:
            utilisation = latest.get("compute_utilisation")
            logger.info(
                f"averaging totals: rounds {latest['averaging_succeeded']} ok / {latest['averaging_failed']} failed, "
                f"sent {latest['bytes_sent']} B, received {latest['bytes_received']} B, compute utilisation "
                + (f"{utilisation:.4f}" if utilisation is not None else "n/a")
            )
            logger.info(
                f"global steps taken alone (no other peer to average with): {latest.get('averaging_alone', 0)}"
            )


def make_strategy(
    spec: RunSpec, dht: DHT, params: list[torch.nn.Parameter], listener: AveragingListener
) -> AveragingStrategy:
    """The spec's averaging strategy over ``params`` (the trainable tensors), reporting to ``listener``."""
    codecs.install()  # before the averagers fork: 8-bit codecs must decode in their processes
    aggregate_with(spec.averaging.aggregator.rule())  # likewise: their reducers take the run's rule
    wire_bytes = sum(p.numel() for p in params) * WIRE_BYTES_PER_ELEMENT[spec.averaging.compression]
    if (too_tight := check_deadline_fits(wire_bytes, spec.averaging.averaging_timeout)) is not None:
        logger.warning(too_tight)
    if spec.averaging.strategy == "diloco":
        return _Accounted(DiLoCoAveraging(spec, dht, params, listener=listener), listener, False)
    return _Accounted(GradientAveraging(spec, dht, params, listener=listener), listener, True)
