"""Load the run's model and tokenizer (hub id or local folder), wrap it with the run's adapter, and save it.

Every adapter kind trains, checkpoints, resumes, evaluates and generates the same way for the rest of the peer:

- LoRA and IA3 add weights inside the model's layers: a checkpoint is peft's adapter folder, resumed with
  ``PeftModel.from_pretrained(is_trainable=True)``.
- Prefix tuning, P-tuning and prompt tuning (peft's *prompt learning*) learn virtual tokens. peft's adapter file
  holds only the tokens' final embeddings, which is what inference loads; peft refuses to make such a checkpoint
  trainable, and for P-tuning the MLP that produces the embeddings is not in it. So a checkpoint also holds the
  prompt encoder's whole state (``PROMPT_ENCODER_FILE``), and resuming builds the adapter afresh and loads it.
- Prompt tuning and P-tuning put their virtual tokens in front of the input, so the model's logits and hidden
  states have that many extra leading positions; ``adapt_prompt_learning`` drops them, so that position ``t`` of
  every output belongs to input token ``t`` whatever the adapter (prefix tuning's tokens are past keys and values
  and add no positions). Their ``generate`` uses the trained tokens under transformers 5 from peft 0.22 on (peft
  0.21 looked for the generation cache under its old name: ``pyproject.toml`` requires 0.22).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PeftType,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from potluck.peer.quantization import bitsandbytes_config, prepare_for_training
from potluck.protocols.runspec import (
    IA3Adapter,
    LoraAdapter,
    ModelSpec,
    NoAdapter,
    PrefixTuningAdapter,
    PromptTuningAdapter,
    PTuningAdapter,
    RunSpec,
)

PROMPT_ENCODER_FILE = "prompt_encoder.safetensors"
"""In a prompt-learning checkpoint: every tensor of the prompt encoder (P-tuning's MLP included), for resuming."""

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


def stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """The tokens that end a generated completion: the tokenizer's EOS and those of the model's generation config.
    Instruct checkpoints whose chat turns end in a token other than EOS list it there (Gemma: ``<end_of_turn>``;
    Llama 3: ``<|eot_id|>``); stopping at EOS alone, a rollout would run on past the end of its turn."""
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ids = [tokenizer.eos_token_id, *configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


NO_HUB_KERNELS = {"use_kernels": False}
"""``from_pretrained`` options of every model a peer loads. transformers 5 swaps a model's layers for kernels it
downloads from the Hugging Face hub (``kernels-community/…``, code run in the peer) as soon as the model trains
or runs on CUDA, unless told not to: a download at run time that fails offline and wherever the kernel's
publisher cannot be verified (seen on an H200: every ``run-peer --gpu 0`` crashed at start), and code a
volunteer never chose to run."""


def load_base_model(spec: ModelSpec, device: torch.device) -> PreTrainedModel:
    """The causal LM of ``spec`` on ``device``; its linear layers quantised as ``model.quantization`` says (by
    bitsandbytes as they load, straight onto ``device``: a quantised model cannot be moved later)."""
    config = bitsandbytes_config(spec)
    if config is None:
        model = AutoModelForCausalLM.from_pretrained(
            spec.name_or_path, revision=spec.revision, dtype=getattr(torch, spec.dtype), **NO_HUB_KERNELS
        )
        return model.to(device)
    return AutoModelForCausalLM.from_pretrained(
        spec.name_or_path,
        revision=spec.revision,
        dtype=getattr(torch, spec.dtype),
        quantization_config=config,
        device_map={"": device},
        **NO_HUB_KERNELS,
    )


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
    if isinstance(adapter, IA3Adapter):
        targets = {}  # none given: peft's modules for the architecture
        if adapter.target_modules is not None:
            targets = {
                "target_modules": adapter.target_modules,
                "feedforward_modules": adapter.feedforward_modules,
            }
        return IA3Config(task_type=TaskType.CAUSAL_LM, **targets)
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
    if spec.model.quantized:
        base = prepare_for_training(base)
    if weights_from and not config.is_prompt_learning:
        model = PeftModel.from_pretrained(base, weights_from, is_trainable=True)
    else:
        torch.manual_seed(spec.seed)
        model = get_peft_model(base, config)
        if weights_from:
            load_prompt_encoder(model, Path(weights_from))
    model.train()
    return adapt_prompt_learning(model.to(device))


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a peft model with prefix tuning, P-tuning or prompt tuning."""
    config = getattr(model, "active_peft_config", None)
    return config is not None and config.is_prompt_learning


def virtual_positions(model: torch.nn.Module) -> int:
    """Positions that ``model``'s adapter puts before the input in its outputs: prompt tuning's and P-tuning's
    virtual tokens; 0 for prefix tuning (past keys and values), LoRA, IA3 and a model without adapter."""
    if not is_prompt_learning(model) or model.active_peft_config.peft_type == PeftType.PREFIX_TUNING:
        return 0
    return model.active_peft_config.num_virtual_tokens


def adapt_prompt_learning(model: torch.nn.Module) -> torch.nn.Module:
    """Make a prefix-, P- or prompt-tuned peft model behave like any other model for the stages; returns ``model``
    (unchanged when it has no such adapter).

    - Its logits and hidden states lose the virtual tokens' positions (module docstring): peft leaves them in (it
      drops them only from the labels of the loss it computes), and every stage and evaluation reads outputs
      position by position against ``input_ids``. ``generate`` runs the base model, not this forward.
    """
    if not is_prompt_learning(model):
        return model
    count = virtual_positions(model)
    if count:
        model.register_forward_hook(partial(_drop_leading_positions, count))
    return model


def _drop_leading_positions(count: int, module, args, output):
    output.logits = output.logits[:, count:]
    if output.get("hidden_states") is not None:
        output.hidden_states = tuple(h[:, count:] for h in output.hidden_states)
    return output


def save_weights(model: torch.nn.Module, folder: Path) -> None:
    """``save_pretrained`` (what inference, ``init_from`` and ``potluck chat`` load) plus, for prompt learning, the
    prompt encoder's whole state (``PROMPT_ENCODER_FILE``), which resuming needs."""
    model.save_pretrained(folder)
    if is_prompt_learning(model):
        encoder = model.prompt_encoder[model.active_adapter]
        tensors = {name: t.detach().contiguous().cpu() for name, t in encoder.state_dict().items()}
        save_file(tensors, Path(folder) / PROMPT_ENCODER_FILE)


def load_prompt_encoder(model: torch.nn.Module, folder: Path) -> None:
    """Restore the prompt encoder that :func:`save_weights` wrote to ``folder`` into ``model`` (same adapter)."""
    path = folder / PROMPT_ENCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {folder} has no {PROMPT_ENCODER_FILE}: a {model.active_peft_config.peft_type.value} run "
            "resumes only from a checkpoint written with its prompt encoder"
        )
    encoder = model.prompt_encoder[model.active_adapter]
    device = next(encoder.parameters()).device
    encoder.load_state_dict({name: t.to(device) for name, t in load_file(path).items()})


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The tensors that the swarm averages: everything with ``requires_grad``, in a stable order."""
    return [p for p in model.parameters() if p.requires_grad]
