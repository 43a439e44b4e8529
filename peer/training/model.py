"""Load the run's model and tokenizer (hub id or local folder) and wrap it with the run's adapter."""

from __future__ import annotations

import torch
from peft import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from potluck.protocols.runspec import (
    LoraAdapter,
    ModelSpec,
    NoAdapter,
    PrefixTuningAdapter,
    PromptTuningAdapter,
    PTuningAdapter,
    RunSpec,
)


def load_tokenizer(spec: ModelSpec):
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or spec.name_or_path, revision=spec.revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # many causal LMs ship without a pad token
    return tokenizer


def load_base_model(spec: ModelSpec, device: torch.device) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        spec.name_or_path, revision=spec.revision, dtype=getattr(torch, spec.dtype)
    )
    return model.to(device)


def peft_config(adapter):
    """Translate the spec's adapter into a peft config (None for full fine-tuning)."""
    if isinstance(adapter, NoAdapter):
        return None
    if isinstance(adapter, LoraAdapter):
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=adapter.r,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            target_modules=adapter.target_modules,
        )
    if isinstance(adapter, PrefixTuningAdapter):
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=adapter.num_virtual_tokens)
    if isinstance(adapter, PTuningAdapter):
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=adapter.num_virtual_tokens,
            encoder_hidden_size=adapter.encoder_hidden_size,
        )
    if isinstance(adapter, PromptTuningAdapter):
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=adapter.num_virtual_tokens)
    raise TypeError(f"unsupported adapter {adapter!r}")


def build_model(spec: RunSpec, device: torch.device, weights_from: str | None = None):
    """Load the base model and wrap it with the run's adapter.

    The adapter is initialised under ``spec.seed`` so every peer starts from identical weights even
    before it downloads the swarm's state. ``weights_from`` (a checkpoint folder) restores trained
    weights: the adapter for adapter runs, the whole model for full fine-tuning.
    """
    config = peft_config(spec.adapter)
    if config is None:
        model = load_base_model(
            spec.model.model_copy(update={"name_or_path": weights_from}) if weights_from else spec.model,
            device,
        )
        model.train()
        return model
    base = load_base_model(spec.model, device)
    if weights_from:
        model = PeftModel.from_pretrained(base, weights_from, is_trainable=True)
    else:
        torch.manual_seed(spec.seed)
        model = get_peft_model(base, config)
    model.train()
    return model.to(device)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The tensors that the swarm averages: everything with ``requires_grad``, in a stable order."""
    return [p for p in model.parameters() if p.requires_grad]
