"""Knowledge distillation: the student (the run's model) matches a frozen teacher's next-token distributions."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoTokenizer

from potluck.peer.training.stages.base import Stage, StageContext
from potluck.peer.training.stages.data import completion_mask
from potluck.peer.training.stages.losses import distillation_kl
from potluck.peer.training.stages.models import load_frozen_causal_lm, resolve_weights, same_vocabulary
from potluck.protocols.runspec import RunSpecError


class Distillation(Stage):
    """Loss: ``teacher.temperature**2 * KL(teacher || student)`` of the softened next-token distributions on the
    completion tokens of TRL-format data, plus ``teacher.hard_label_weight`` times the usual cross-entropy. The
    teacher (``teacher.path``: a run id or folder) may be larger than the student but must share its tokenizer.
    Metric: ``teacher_kl``."""

    def __init__(self, context: StageContext):
        super().__init__(context)
        teacher = context.spec.teacher
        path = resolve_weights(teacher.path, context.save_dir, "teacher.path")
        if not same_vocabulary(AutoTokenizer.from_pretrained(path), context.tokenizer):
            raise RunSpecError(
                "<spec>",
                [f"teacher.path: {teacher.path!r} has another tokenizer than the student; distillation compares "
                 "logits token by token, so both must share one vocabulary"],
            )  # fmt: skip
        self.teacher = load_frozen_causal_lm(path, context.device, context.spec.model.dtype)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        teacher = self.context.spec.teacher
        out = model(**batch)
        with torch.no_grad():
            teacher_logits = self.teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        mask = completion_mask(batch["labels"])
        kl = distillation_kl(out.logits, teacher_logits, teacher.temperature, mask)
        self.last_metrics = {"teacher_kl": float(kl.detach()) / teacher.temperature**2}
        if teacher.hard_label_weight > 0:
            return kl + teacher.hard_label_weight * out.loss
        return kl
