"""The optimizer policy of weights that shard servers train from the gradients clients send back: a span's LoRA
adapter (``adapters.py``) or experts (``expert_service.py``).

The gradients of ``accumulate`` backward requests are averaged into one AdamW step with the run's ``optimizer``
(learning rate, betas, weight decay; warm-up and schedule counted in these server steps; the gradient clipped to
``max_grad_norm`` if set). A step whose gradients hold NaN or Inf is dropped, not taken.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from potluck.peer.averaging.gradient import adamw_with_state, lr_lambda
from potluck.protocols.runspec import RunSpec

logger = logging.getLogger(__name__)


class ServerSteps:
    """``parameters``' AdamW and schedule; ``lock`` guards them (hold it for every pass and step)."""

    def __init__(self, parameters: list[torch.Tensor], spec: RunSpec, accumulate: int, what: str):
        self.parameters = parameters
        opt = spec.optimizer
        # the statistics exist from the start: they are averaged with the replicas and served to late joiners
        self.optimizer = adamw_with_state(self.parameters, opt)
        self._factor = lr_lambda(opt.warmup_steps, opt.schedule, spec.max_global_steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._factor)
        self.accumulate = accumulate
        self.max_grad_norm = opt.max_grad_norm
        self.what = what
        self.lock = threading.Lock()
        self.steps = 0
        """Steps taken (this server's optimizer steps, or those of the state it resumed or downloaded)."""
        self.pending = 0
        """Backward requests whose gradients wait in ``.grad`` for the next step."""
        self.dropped = 0
        """Steps not taken because their gradients held NaN or Inf."""
        self.on_step: Callable[[int], None] | None = None
        """Called after each step with the step count, ``lock`` held (the periodic checkpoint)."""

    def after_backward(self) -> bool:
        """Count a backward request whose gradients backward just added to the parameters' ``.grad`` (call with
        ``lock`` held); on every ``accumulate``-th, take a step on their mean. True if it stepped."""
        self.pending += 1
        if self.pending < self.accumulate:
            return False
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            # finite inputs can still overflow: one such request must not turn every client's weights to NaN
            logger.warning(
                f"{self.what}: dropped {self.pending} backward request(s) whose gradients hold NaN or Inf"
            )
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = 0
            self.dropped += 1
            return False
        for parameter in self.parameters:
            if parameter.grad is not None:
                parameter.grad.div_(self.pending)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self.steps)
        return True
