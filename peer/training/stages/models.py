"""Models around a stage: where a run id's weights are, frozen helpers (reference, teacher, reward model), the
actor-critic of PPO, and the log-probability arithmetic every preference and RL stage shares."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from potluck.peer.training.checkpoint import latest_checkpoint, list_checkpoints
from potluck.peer.training.data import IGNORE_INDEX
from potluck.peer.training.model import (
    NO_HUB_KERNELS,
    WeightsNotFoundError,
    adapt_prompt_learning,
    check_model_source,
    check_model_spec,
    save_weights,
)
from potluck.peer.training.stages.data import PROMPT_STAGES
from potluck.protocols.runspec import EXACT_ANSWER, RunSpec

VALUE_HEAD_FILE = "value_head.pt"


def resolve_weights(reference: str, save_dir: Path | None, field: str) -> str:
    """A model folder for ``reference``: a folder with a model in it, a ``--save-dir``-like folder (its newest
    checkpoint), a run id (its newest checkpoint in ``save_dir``), or else as given (a hub id)."""
    folder = Path(reference)
    if folder.is_dir():
        if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
            return str(folder)
        found = list_checkpoints(folder)
        if found:  # several runs may share a --save-dir: the newest is the last written, not the highest step
            return str(max(found, key=lambda c: (c.path / "trainer_state.json").stat().st_mtime).path)
        raise WeightsNotFoundError(f"{field}: folder {reference!r} holds no model and no checkpoint")
    if save_dir is not None:
        checkpoint = latest_checkpoint(save_dir, reference)
        if checkpoint is not None:
            return str(checkpoint.path)
    if "/" in reference and not reference.startswith(("/", ".")):
        check_model_source(reference, field)  # a hub id: offline, it must be in the local cache
        return reference
    where = f"in --save-dir {save_dir}" if save_dir is not None else "(no --save-dir given)"
    raise WeightsNotFoundError(
        f"{field}: {reference!r} is neither a model folder nor a run with a checkpoint {where}"
    )


def check_stage_models(spec: RunSpec, save_dir: Path | None) -> None:
    """Every model the run's stage loads can be found from here: the starting weights (``init_from``, else
    ``model.name_or_path``), the tokenizer, and the reference, reward model and teacher it names. Cheap (no
    model is read), so a typo in any of them fails before the first one loads."""
    if spec.init_from is not None:  # it takes the place of model.name_or_path
        resolve_weights(spec.init_from, save_dir, "init_from")
    check_model_spec(spec.model, weights=spec.init_from is None)
    named = [("teacher.path", spec.teacher.path if spec.teacher is not None else None)]
    if spec.stage in ("dpo", *PROMPT_STAGES):
        named.append(("reference.path", spec.reference.path))  # None: the starting weights, checked above
    if spec.stage in PROMPT_STAGES and spec.rl.reward != EXACT_ANSWER:
        named.append(("rl.reward", spec.rl.reward))
    for field, reference in named:
        if reference is not None:
            resolve_weights(reference, save_dir, field)


def is_adapter_folder(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_frozen_causal_lm(path: str, device: torch.device, dtype: str = "float32") -> torch.nn.Module:
    """A causal LM for inference only (reference, teacher, evaluation, chat): eval mode, no gradients. An adapter
    checkpoint is loaded on its base model: LoRA and IA3 merged into it; virtual tokens (prefix, P-tuning, prompt
    tuning), which cannot be merged, kept as a peft model whose outputs line up with its inputs."""
    if is_adapter_folder(path):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **NO_HUB_KERNELS)
        model = (
            adapt_prompt_learning(model)
            if model.active_peft_config.is_prompt_learning
            else model.merge_and_unload()
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **NO_HUB_KERNELS)
    return freeze(model.to(device))


def load_reward_model(path: str, device: torch.device, seed: int | None = None) -> torch.nn.Module:
    """A sequence-classification model with one output (the scalar reward). A causal-LM folder gets a new score
    head, initialised under ``seed`` so that every peer starts with the same one."""
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **NO_HUB_KERNELS)
    if model.config.pad_token_id is None:
        # the head reads the last non-padding token; without a pad id it cannot find it in a padded batch. A
        # tokenizer without a pad token (Mistral's) pads with EOS, as ``load_tokenizer`` makes it: the score is
        # then read at the token before the EOS, alike in training and scoring
        tokenizer = AutoTokenizer.from_pretrained(path)
        pad = tokenizer.pad_token_id
        model.config.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
    return model.to(device)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


# ------------------------------------------------------------------------------------------ log-probabilities


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]`` per position: ``(B, T, V)``, ``(B, T)`` → ``(B, T)``."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def labelled_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence's labelled (completion) tokens, and how many there are: ``(B,)``, ``(B,)``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    per_token = gather_logprobs(logits, torch.where(mask, labels, 0))
    return (per_token * mask).sum(-1), mask.sum(-1)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, as ``generate`` numbered them: the first real token is position 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class ActorCritic(torch.nn.Module):
    """PPO's trained module: the policy and a scalar value head on its last hidden state (TRL's
    ``AutoModelForCausalLMWithValueHead``). Both are averaged by the swarm. ``save_pretrained`` writes the policy
    as an ordinary model folder (what chat, evaluation and the next stage load) plus ``value_head.pt``."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy
        hidden = policy.config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1).to(next(policy.parameters()).device)
        torch.nn.init.zeros_(self.value_head.bias)
        torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))

    def generate(self, *args, **kwargs):
        return self.policy.generate(*args, **kwargs)

    @property
    def generation_config(self):
        """The policy's (where generation stops: ``stop_token_ids``)."""
        return self.policy.generation_config

    def forward(self, input_ids, attention_mask, position_ids=None):
        """``(logits, values)``: values ``(B, T)`` predicted at every position, from the same forward pass."""
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
        )
        return out.logits, self.value_head(out.hidden_states[-1].float()).squeeze(-1)

    def save_pretrained(self, folder) -> None:
        save_weights(self.policy, folder)
        torch.save(self.value_head.state_dict(), Path(folder) / VALUE_HEAD_FILE)

    def load_value_head(self, folder: str) -> None:
        path = Path(folder) / VALUE_HEAD_FILE
        if path.is_file():
            self.value_head.load_state_dict(torch.load(path, map_location=self.value_head.weight.device))
