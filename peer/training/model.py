"""Load the run's model and tokenizer (hub id or local folder) and wrap it with the run's adapter."""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
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

MODEL_FILES = ("config.json", "adapter_config.json")
"""A folder (or hub repository) holds a model when it has one of these (a whole model, a peft adapter)."""
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class WeightsNotFoundError(FileNotFoundError):
    """A model named by the spec (``model.name_or_path``, ``init_from``, a reference, teacher or reward model) or
    on the command line cannot be found from this machine; ``str()`` is one line naming the field."""


def check_model_source(name_or_path: str, field: str, revision: str | None = None, files=MODEL_FILES) -> None:
    """Fail, naming ``field``, when ``name_or_path`` cannot be loaded from here, before anything starts loading:
    neither a folder holding one of ``files`` nor a hub id (``org/name``), or a hub id missing from the local
    cache while the hub is offline (``HF_HUB_OFFLINE=1``). Online, a hub id is left to ``from_pretrained``,
    which downloads it or says that it does not exist."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        if not any((folder / name).is_file() for name in files):
            raise WeightsNotFoundError(f"{field}: folder {name_or_path!r} holds no {' or '.join(files)}")
        return
    if name_or_path.startswith(("/", "./", "../", "~")):
        raise WeightsNotFoundError(f"{field}: folder {name_or_path!r} does not exist")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise WeightsNotFoundError(
            f"{field}: {name_or_path!r} is neither a folder nor a hub id (org/name)"
        ) from None
    # transformers would say it "couldn't connect to 'https://huggingface.co'", in a traceback
    if constants.is_offline_mode() and not any(
        isinstance(try_to_load_from_cache(name_or_path, name, revision=revision), str) for name in files
    ):
        raise WeightsNotFoundError(
            f"{field}: {name_or_path!r} is not a folder, and as a hub id it is not in the local cache "
            f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set: download it once online, or name a folder"
        )


def check_model_spec(spec: ModelSpec, weights: bool = True) -> None:
    """The model (unless not ``weights``: ``init_from`` replaces it) and the tokenizer of ``spec`` can be loaded
    from here (:func:`check_model_source`)."""
    if weights:
        check_model_source(spec.name_or_path, "model.name_or_path", spec.revision)
    if spec.tokenizer is not None:
        check_model_source(spec.tokenizer, "model.tokenizer", spec.revision, TOKENIZER_FILES)


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
