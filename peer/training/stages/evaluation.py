"""Held-out evaluation of each stage's result, in the stage's own terms (the pipeline's before/after table).

| stage | figures |
| --- | --- |
| sft | held-out loss, exact-match accuracy (``peer/training/exact_match.py``) |
| rm | pairwise accuracy of the reward model on held-out pairs |
| dpo | preference accuracy: share of held-out pairs where the policy gives the chosen answer the higher log-prob; preference margin: the mean of log p(chosen) − log p(rejected) over them, in nats |
| grpo, ppo | mean reward and exact-match of greedy completions of held-out prompts, KL(policy ‖ reference) on them; with ``exact_answer``, the exact expected reward of a sampled rollout (``answer_probability``) |
| distill | KL(teacher ‖ student) per completion token on held-out data; exact-match accuracy |
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from potluck.peer.training.data import collate, detect_format, load_rows, tokenize_example
from potluck.peer.training.exact_match import evaluate
from potluck.peer.training.stages.data import completion_mask, left_pad, stage_data
from potluck.peer.training.stages.models import (
    gather_logprobs,
    labelled_logprobs,
    load_frozen_causal_lm,
    load_reward_model,
    positions,
    resolve_weights,
)
from potluck.peer.training.stages.rollout import (
    ExactAnswerReward,
    RewardModelScorer,
    Rollouts,
    completion_logits,
    generate_rollouts,
)
from potluck.protocols.runspec import EXACT_ANSWER, RunSpec

EVAL_LIMIT = 256
"""Held-out rows evaluated (the tiny task holds out 248 problems)."""


def _batches(items: list, size: int = 64):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def reward_model_accuracy(model, tokenizer, spec: RunSpec, rows: list[dict]) -> float:
    data = stage_data(spec.model_copy(update={"stage": "rm"}), tokenizer)
    correct = 0
    for chunk in _batches(rows):
        batch = data.collate([data.encode(r) for r in chunk])
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        chosen, rejected = scores.chunk(2)
        correct += int((chosen > rejected).sum())
    return correct / len(rows)


@torch.no_grad()
def preference_figures(policy, tokenizer, spec: RunSpec, rows: list[dict]) -> dict[str, float]:
    """Share of pairs where the policy's summed log-prob of the chosen completion beats the rejected one's
    (``preference_accuracy``), and the mean gap between the two (``preference_margin``, nats): the count moves
    only when a pair flips, the gap with every step DPO takes on pairs like these."""
    data = stage_data(spec.model_copy(update={"stage": "dpo"}), tokenizer)
    correct, gap = 0, 0.0
    for chunk in _batches(rows):
        logps, _ = labelled_logprobs(policy, data.collate([data.encode(r) for r in chunk]))
        chosen, rejected = logps.chunk(2)
        correct += int((chosen > rejected).sum())
        gap += float((chosen - rejected).sum())
    return {"preference_accuracy": correct / len(rows), "preference_margin": gap / len(rows)}


@torch.no_grad()
def rollout_quality(
    policy, reference, tokenizer, spec: RunSpec, rows: list[dict], reward
) -> dict[str, float]:
    """Greedy completions of held-out prompts: mean reward, exact-match (when rows have answers), and the exact
    per-token KL(policy ‖ reference) over the vocabulary along those completions."""
    data = stage_data(spec.model_copy(update={"stage": "grpo"}), tokenizer)
    total_reward = exact = kl_sum = tokens = 0.0
    for chunk in _batches(rows):
        examples = [data.encode(r) for r in chunk]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in examples], pad_id)
        rollouts = generate_rollouts(policy, tokenizer, prompt_ids, prompt_mask, spec.rl.max_new_tokens, None)
        prompts, answers = [e.prompt for e in examples], [e.answer for e in examples]
        total_reward += float(reward(prompts, rollouts.completions, answers).sum())
        if all(a is not None for a in answers):
            exact += float(ExactAnswerReward()(prompts, rollouts.completions, answers).sum())
        mask, start = rollouts.attention_mask, rollouts.prompt_width - 1
        kwargs = {"input_ids": rollouts.sequences, "attention_mask": mask, "position_ids": positions(mask)}
        log_p = F.log_softmax(policy(**kwargs).logits[:, start:-1].float(), -1)
        log_q = F.log_softmax(reference(**kwargs).logits[:, start:-1].float(), -1)
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
        kl_sum += float((per_token * rollouts.completion_mask).sum())
        tokens += float(rollouts.completion_mask.sum())
    return {
        "mean_reward": total_reward / len(rows),
        "exact_match": exact / len(rows),
        "kl": kl_sum / max(tokens, 1),
    }


@torch.no_grad()
def answer_probability(policy, tokenizer, spec: RunSpec, rows: list[dict]) -> float:
    """Mean probability, over held-out prompts, that a rollout sampled as the RL stages sample them (at
    ``rl.temperature``, ``rl.max_new_tokens``) is exactly the row's answer: the expected ``exact_answer`` reward of
    the policy, computed exactly instead of estimated from samples (greedy exact-match moves only when an argmax
    flips). The answer is scored as its own tokens then EOS (no EOS when it fills ``max_new_tokens``); other token
    sequences that decode to the same text are not counted, so this is a lower bound."""
    data = stage_data(spec.model_copy(update={"stage": "grpo"}), tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    limit, total = spec.rl.max_new_tokens, 0.0
    for chunk in _batches(rows):
        examples = [data.encode(r) for r in chunk]
        if any(e.answer is None for e in examples):
            raise ValueError("answer_probability needs an 'answer' in every row")
        prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in examples], pad_id)
        answers = [tokenizer(e.answer, add_special_tokens=False).input_ids for e in examples]
        answers = [(a + [tokenizer.eos_token_id])[:limit] if len(a) <= limit else None for a in answers]
        width = max(len(a) for a in answers if a is not None) if any(answers) else 1
        ids = torch.tensor([(a or []) + [pad_id] * (width - len(a or [])) for a in answers])
        mask = torch.tensor([[1] * len(a or []) + [0] * (width - len(a or [])) for a in answers])
        rollouts = Rollouts(
            sequences=torch.cat([prompt_ids, ids], dim=1),
            attention_mask=torch.cat([prompt_mask, mask], dim=1),
            prompt_width=prompt_ids.shape[1],
            completion_mask=mask,
            completions=[e.answer for e in examples],
            generation_seconds=0.0,
        )
        logits, _ = completion_logits(policy, rollouts, spec.rl.temperature)
        log_p = (gather_logprobs(logits, ids) * mask).sum(-1)
        reachable = torch.tensor([a is not None for a in answers])
        total += float(torch.where(reachable, log_p.exp(), 0.0).sum())
    return total / len(rows)


@torch.no_grad()
def teacher_kl(student, teacher, tokenizer, spec: RunSpec, rows: list[dict]) -> float:
    """KL(teacher ‖ student) per completion token (temperature 1)."""
    fmt = detect_format(rows[0], spec.data.format)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kl_sum = tokens = 0.0
    for chunk in _batches(rows):
        batch = collate([tokenize_example(r, fmt, tokenizer, spec.data.max_length) for r in chunk], pad_id)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        log_q = F.log_softmax(student(**inputs).logits.float(), -1)
        log_p = F.log_softmax(teacher(**inputs).logits.float(), -1)
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
        mask = completion_mask(batch["labels"])
        kl_sum += float((per_token * mask).sum())
        tokens += float(mask.sum())
    return kl_sum / max(tokens, 1)


def evaluate_stage(spec: RunSpec, weights: str, save_dir: Path | None = None) -> dict[str, float]:
    """Evaluate the model in folder ``weights`` as the result of ``spec``'s stage on ``spec.data.eval_path``.

    Passing the run's *starting* weights gives the "before" figures (for ``rm``, the start model with a fresh score
    head, seeded like the run's)."""
    from transformers import AutoTokenizer

    if spec.data.eval_path is None:
        raise ValueError("data.eval_path: required to evaluate a stage")
    rows = load_rows(spec.data.eval_path)[:EVAL_LIMIT]
    tokenizer = AutoTokenizer.from_pretrained(weights)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = torch.device("cpu")
    torch.manual_seed(spec.seed)
    if spec.stage == "rm":
        model = load_reward_model(weights, device, spec.seed).eval()
        return {"pairwise_accuracy": reward_model_accuracy(model, tokenizer, spec, rows)}
    policy = load_frozen_causal_lm(weights, device, spec.model.dtype)
    if spec.stage == "dpo":
        return preference_figures(policy, tokenizer, spec, rows)
    if spec.stage in ("grpo", "ppo"):
        start = spec.reference.path or spec.init_from or spec.model.name_or_path
        reference = load_frozen_causal_lm(resolve_weights(start, save_dir, "reference.path"), device)
        reward = (
            ExactAnswerReward()
            if spec.rl.reward == EXACT_ANSWER
            else RewardModelScorer(resolve_weights(spec.rl.reward, save_dir, "rl.reward"), device)
        )
        figures = rollout_quality(policy, reference, tokenizer, spec, rows, reward)
        if spec.rl.reward == EXACT_ANSWER:
            figures["answer_probability"] = answer_probability(policy, tokenizer, spec, rows)
        return figures
    result = evaluate(
        policy, tokenizer, spec.data.eval_path, max_length=spec.data.max_length, limit=EVAL_LIMIT
    )
    figures = {"loss": result.loss, "exact_match": result.accuracy}
    if spec.stage == "distill":
        teacher = load_frozen_causal_lm(resolve_weights(spec.teacher.path, save_dir, "teacher.path"), device)
        figures["teacher_kl"] = teacher_kl(policy, teacher, tokenizer, spec, rows)
    return figures
