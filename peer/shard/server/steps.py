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

from potluck.peer.averaging.gradient import ADAM_STATISTICS, adamw_with_state, lr_lambda
from potluck.protocols.runspec import RunSpec

logger = logging.getLogger(__name__)


class StateMismatch(ValueError):
    """A saved, downloaded or averaged state whose tensors are not these parameters'."""


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

    def idle_step(self) -> bool:
        """A step on a zero gradient (call with ``lock`` held): the step a trainer's optimizer takes on an expert its
        batch routed no token to, moving it on AdamW's momentum and weight decay alone. With backward requests
        waiting (``accumulate`` > 1) it counts as one more, with nothing added."""
        for parameter in self.parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        return self.after_backward()

    # -- the state that replicas average, late joiners download and checkpoints hold ------------------
    def state_tensors(self) -> list[torch.Tensor]:
        """The live tensors that make the state: the parameters, then AdamW's ``exp_avg`` and ``exp_avg_sq`` of
        each (in ``parameters``' order). Read or write them with ``lock`` held."""
        statistics = [self.optimizer.state[p][key] for key in ADAM_STATISTICS for p in self.parameters]
        return [p.data for p in self.parameters] + statistics

    def snapshot(self) -> tuple[list[torch.Tensor], int]:
        """A copy of :meth:`state_tensors` and the step they are of (call with ``lock`` held)."""
        return [t.detach().clone() for t in self.state_tensors()], self.steps

    def check_shapes(self, tensors: list[torch.Tensor], source: str) -> None:
        """Raise :class:`StateMismatch` naming ``source`` unless ``tensors`` have the shapes of this state's."""
        own = [tuple(t.shape) for t in self.state_tensors()]
        if [tuple(t.shape) for t in tensors] != own:
            raise StateMismatch(
                f"{source} holds {len(tensors)} tensors of other shapes than this {self.what}'s {len(own)} "
                f"(another model, or adapter.r or target_modules changed?)"
            )

    def adopt(self, tensors: list[torch.Tensor], steps: int, source: str) -> None:
        """Take a state (:meth:`snapshot`'s, saved or downloaded) in place of this one (call with ``lock`` held):
        its tensors, and its step for AdamW's bias correction and the schedule. Raises :class:`StateMismatch`
        naming ``source`` when the tensors are not this state's."""
        self.check_shapes(tensors, source)
        for target, value in zip(self.state_tensors(), tensors, strict=True):
            target.copy_(value)
        for parameter in self.parameters:
            self.optimizer.state[parameter]["step"].fill_(steps)
        self.steps, self.pending = steps, 0
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.last_epoch = steps
        for group, base in zip(self.optimizer.param_groups, self.schedule.base_lrs, strict=True):
            group["lr"] = base * self._factor(steps)

    def move_to(self, averaged: list[torch.Tensor], sent: list[torch.Tensor], sent_at: int) -> None:
        """Take the replicas' average of the state this one sent at step ``sent_at`` (call with ``lock`` held):
        exactly, when no step was taken since (replicas that averaged together then hold the same tensors to the
        bit); else move by (average − sent), so the steps taken meanwhile are kept."""
        live = self.state_tensors()
        if self.steps == sent_at:
            for tensor, value in zip(live, averaged, strict=True):
                tensor.copy_(value)
            return
        for tensor, value, before in zip(live, averaged, sent, strict=True):
            tensor.add_(value - before)
        for second_moment in live[-len(self.parameters) :]:
            second_moment.clamp_(min=0)  # steps taken meanwhile decayed it under what was averaged away

    @property
    def learning_rate(self) -> float:
        """The rate of the next step."""
        return self.optimizer.param_groups[0]["lr"]
