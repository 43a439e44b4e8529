"""Rollouts of the RL stages, made on the peer that trains on them: KV-cached sampling with the current policy,
then a scalar reward per completion from a verifiable check or a reward model. Rollouts never leave the peer."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from potluck.peer.training.model import stop_token_ids
from potluck.peer.training.stages.data import reward_model_example
from potluck.peer.training.stages.models import load_reward_model, positions, resolve_weights
from potluck.protocols.runspec import EXACT_ANSWER, RLSpec


@dataclass
class Rollouts:
    """``N`` sampled sequences: left-padded prompts of width ``prompt_width`` followed by completions."""

    sequences: torch.Tensor
    """``(N, P + L)`` token ids."""
    attention_mask: torch.Tensor
    """``(N, P + L)``: the prompts' mask, then :attr:`completion_mask`."""
    prompt_width: int
    completion_mask: torch.Tensor
    """``(N, L)`` 1 on completion tokens up to and including the first EOS."""
    completions: list[str]
    generation_seconds: float

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width :]

    @property
    def generated_tokens(self) -> int:
        return int(self.completion_mask.sum())


def mask_after_eos(completion_ids: torch.Tensor, eos_token_ids: int | list[int]) -> torch.Tensor:
    """1 up to and including each row's first EOS, or first of any of ``eos_token_ids`` (everything when there is
    none), 0 after it."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device)).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long()


@torch.no_grad()
def generate_rollouts(
    model,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float | None,
) -> Rollouts:
    """Sample one completion per row (``temperature=None``: greedy) with the model's KV cache, up to the end of
    its turn (``stop_token_ids``)."""
    started = time.perf_counter()
    stop = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature is not None
        else {"do_sample": False}
    )
    sequences = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=stop,
        use_cache=True,
        **sampling,
    )
    width = prompt_ids.shape[1]
    completion_mask = mask_after_eos(sequences[:, width:], stop)
    completions = tokenizer.batch_decode(
        torch.where(completion_mask.bool(), sequences[:, width:], pad_id), skip_special_tokens=True
    )
    return Rollouts(
        sequences=sequences,
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        prompt_width=width,
        completion_mask=completion_mask,
        completions=completions,
        generation_seconds=time.perf_counter() - started,
    )


def completion_logits(model, rollouts: Rollouts, temperature: float = 1.0):
    """Logits (divided by the sampling temperature, as TRL does) at the positions that predict each completion
    token, and the model's full output (PPO's actor-critic returns ``(logits, values)``)."""
    mask = rollouts.attention_mask
    out = model(input_ids=rollouts.sequences, attention_mask=mask, position_ids=positions(mask))
    logits = out[0] if isinstance(out, tuple) else out.logits
    start = rollouts.prompt_width - 1
    return logits[:, start:-1] / temperature, out


# ------------------------------------------------------------------------------------------------- rewards


class ExactAnswerReward:
    """Verifiable reward: 1.0 when the completion, stripped, equals the row's ``answer``; else 0.0."""

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str | None]) -> torch.Tensor:
        if any(a is None for a in answers):
            raise ValueError("the exact_answer reward needs an 'answer' in every row")
        scores = [float(c.strip() == a.strip()) for c, a in zip(completions, answers, strict=True)]
        return torch.tensor(scores)


class RewardModelScorer:
    """A trained reward model (any ``AutoModelForSequenceClassification``, e.g. an ``rm`` run's checkpoint) scoring
    prompt + completion. The text is re-tokenized with the reward model's own tokenizer, laid out as the ``rm``
    stage trained it (``reward_model_example``), so a reward model of another architecture works too, an encoder
    included."""

    def __init__(self, path: str, device: torch.device):
        self.model = load_reward_model(path, device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], answers=None) -> torch.Tensor:
        tok = self.tokenizer
        rows = [reward_model_example(p, c, tok).input_ids for p, c in zip(prompts, completions, strict=True)]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # right padding: a decoder's head reads the last non-padding token, an encoder's the first ([CLS])
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=self.device)
        attention_mask = torch.tensor(
            [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device
        )
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float().cpu()


def make_reward(rl: RLSpec, save_dir, device: torch.device):
    """The reward function named by ``rl.reward``."""
    if rl.reward == EXACT_ANSWER:
        return ExactAnswerReward()
    return RewardModelScorer(resolve_weights(rl.reward, save_dir, "rl.reward"), device)


def repeat_prompts(batch: dict, group_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str], list]:
    """Each prompt ``group_size`` times in a row (TRL's ``repeat_interleave`` layout for GRPO groups)."""
    prompts = [p for p in batch["prompts"] for _ in range(group_size)]
    answers = [a for a in batch["answers"] for _ in range(group_size)]
    return (
        batch["prompt_ids"].repeat_interleave(group_size, dim=0),
        batch["prompt_mask"].repeat_interleave(group_size, dim=0),
        prompts,
        answers,
    )
