"""Held-out evaluation: mean completion loss and exact-match accuracy of greedy generations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from potluck.peer.training.data import (
    collate,
    detect_format,
    encode_prompt,
    load_rows,
    row_turns,
    tokenize_example,
    turn_text,
)
from potluck.peer.training.model import build_model, load_tokenizer, stop_token_ids
from potluck.protocols.runspec import RunSpec, RunSpecError


@dataclass(frozen=True)
class EvalResult:
    loss: float
    """Mean per-token cross-entropy on the completions."""
    accuracy: float
    """Share of prompts whose greedy completion equals the reference exactly."""
    examples: int
    answers: tuple[str, ...] = ()
    """The greedy completion of each evaluated row, in the file's order (the demo shows a few)."""


@torch.no_grad()
def evaluate(
    model, tokenizer, eval_path: str, max_length: int = 256, limit: int | None = 500, batch_size: int = 64
) -> EvalResult:
    rows = load_rows(eval_path)[:limit]
    fmt = detect_format(rows[0], "auto")
    was_training = model.training
    model.eval()
    total_loss, total_tokens, answers = 0.0, 0, []
    for chunk, batch in _eval_batches(rows, fmt, tokenizer, max_length, batch_size):
        loss, tokens = _completion_loss(model, batch)
        total_loss, total_tokens = total_loss + loss, total_tokens + tokens
        answers += greedy_completions(model, tokenizer, chunk, fmt)
    model.train(was_training)
    references = [turn_text(row_turns(r, fmt)[1]) for r in rows]
    correct = sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True))
    return EvalResult(
        loss=total_loss / max(total_tokens, 1),
        accuracy=correct / len(rows),
        examples=len(rows),
        answers=tuple(answers),
    )


@torch.no_grad()
def held_out_loss(
    model, tokenizer, eval_path: str, max_length: int = 256, limit: int | None = 500, batch_size: int = 64
) -> float:
    """:func:`evaluate`'s loss alone (no generation): the mean per-token cross-entropy on the completions, without
    any auxiliary loss the model adds to ``.loss`` (a mixture of experts' router loss)."""
    rows = load_rows(eval_path)[:limit]
    was_training = model.training
    model.eval()
    batches = _eval_batches(rows, detect_format(rows[0], "auto"), tokenizer, max_length, batch_size)
    sums = [_completion_loss(model, batch) for _, batch in batches]
    model.train(was_training)
    return sum(loss for loss, _ in sums) / max(sum(tokens for _, tokens in sums), 1)


def _eval_batches(rows: list[dict], fmt: str, tokenizer, max_length: int, batch_size: int):
    """``(rows, their collated batch)``, ``batch_size`` rows at a time."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        yield chunk, collate([tokenize_example(r, fmt, tokenizer, max_length) for r in chunk], pad_id)


def _completion_loss(model, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """The summed cross-entropy of the batch's completion tokens (next-token, labels shifted) and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum", ignore_index=-100
    )
    return loss.item(), int((targets != -100).sum())


def greedy_completions(model, tokenizer, rows, fmt) -> list[str]:
    """Each row's prompt completed greedily, up to one token more than its reference completion."""
    pairs = [row_turns(r, fmt) for r in rows]
    prompts = [encode_prompt(p, tokenizer) for p, _ in pairs]
    width = max(len(p) for p in prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Left padding, so that every row's next token is generated at the same position.
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    max_new = max(len(tokenizer(turn_text(c), add_special_tokens=False).input_ids) for _, c in pairs) + 1
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=stop_token_ids(model, tokenizer),
    )
    return tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)


def evaluate_spec(spec: RunSpec, checkpoint: Path | None) -> EvalResult:
    """Held-out loss and exact match of the spec's model, with ``checkpoint``'s weights if given."""
    if spec.data.eval_path is None:
        raise RunSpecError("<spec>", ["data.eval_path: required to evaluate"])
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(spec.model)
    model = build_model(spec, torch.device("cpu"), weights_from=str(checkpoint) if checkpoint else None)
    return evaluate(model, tokenizer, spec.data.eval_path, max_length=spec.data.max_length)
