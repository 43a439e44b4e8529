"""Training stages: each turns a batch into a loss. The trainer's loop is shared by all of them."""

from __future__ import annotations

from potluck.peer.stages.base import Stage
from potluck.peer.stages.sft import SupervisedFineTuning

STAGES: dict[str, type[Stage]] = {"sft": SupervisedFineTuning}


def make_stage(name: str) -> Stage:
    return STAGES[name]()
