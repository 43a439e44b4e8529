"""Whether the run's model is one its stage and adapter can train, told from its ``config.json`` before any weight
loads (``peer/preflight.py``; one line, exit status 2).

transformers loads more than the decoders a run trains, and says so late or never: ``AutoModelForCausalLM`` turns a
BERT into a ``BertLMHeadModel`` that trains with attention both ways (every token sees the one it is to predict)
without a word, and knows no causal LM for T5 (a ValueError listing 200 config classes); peft finds that no module
matches ``adapter.target_modules`` only once the model has loaded. The families trained by the tests are Llama,
Qwen2, Qwen3, Mistral and Gemma 3 (``tools/tiny/families.py``); another decoder passes these checks and is left to
transformers and peft.
"""

from __future__ import annotations

import torch
from peft import IA3Config, LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.pytorch_utils import Conv1D

from potluck.protocols.runspec import IA3Adapter, LoraAdapter, RunSpec

TESTED_FAMILIES = "Llama, Qwen2, Qwen3, Mistral, Gemma 3"


class UnsupportedModelError(ValueError):
    """The run's model is not one its stage or adapter can train; ``str()`` is one line naming the field."""


def check_architecture(spec: RunSpec) -> None:
    """Raise :class:`UnsupportedModelError` when ``model.name_or_path`` cannot be trained by ``spec.stage`` (``rm``: a
    model with a sequence-classification head; every other stage: a decoder-only causal LM) or when ``spec.adapter``
    names modules that the model does not have. A model whose config cannot be read here (a hub id not yet
    downloaded) is left to loading, which reports it."""
    try:
        config = AutoConfig.from_pretrained(spec.model.name_or_path, revision=spec.model.revision)
    except OSError:
        return
    except (ValueError, KeyError) as e:  # a model type this transformers does not know
        raise UnsupportedModelError(
            f"model.name_or_path {spec.model.name_or_path!r}: {_first_line(e)}"
        ) from None
    where = f"model.name_or_path {spec.model.name_or_path!r} (model type {config.model_type!r})"
    if spec.stage == "rm":
        if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            raise UnsupportedModelError(f"{where}: transformers has no sequence-classification model of this type, "
                                        "which stage 'rm' trains")  # fmt: skip
        return
    kind = _not_a_decoder(config)
    if kind is not None:
        hint = " (an encoder can be a reward model: stage 'rm')" if kind == "an encoder" else ""
        raise UnsupportedModelError(
            f"{where} is {kind}; stage {spec.stage!r} trains a decoder-only causal LM (tested: {TESTED_FAMILIES})"
            + hint
        )
    check_adapter_targets(spec, config)


def check_adapter_targets(spec: RunSpec, config: PretrainedConfig) -> None:
    """``adapter.target_modules`` name at least one module of the model (built on the meta device: no memory, no
    weights read); IA3 without them needs peft's default modules for the model type."""
    adapter = spec.adapter
    if isinstance(adapter, IA3Adapter) and adapter.target_modules is None:
        if config.model_type not in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
            raise UnsupportedModelError(
                f"adapter.target_modules: peft has no default IA3 modules for model type {config.model_type!r}: "
                "name them (with feedforward_modules)"
            )
        return
    if not isinstance(adapter, LoraAdapter | IA3Adapter) or adapter.target_modules == "all-linear":
        return
    peft_config = (LoraConfig if isinstance(adapter, LoraAdapter) else IA3Config)(
        target_modules=adapter.target_modules
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in model.named_modules()]
    if not any(check_target_module_exists(peft_config, name) for name in names):
        layers = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear | Conv1D)})  # fmt: skip
        raise UnsupportedModelError(
            f"adapter.target_modules: {adapter.target_modules} name no module of model type {config.model_type!r} "
            f"({type(model).__name__}); its linear layers are {', '.join(layers)}: name some of them, or "
            "'all-linear'"
        )


def _not_a_decoder(config: PretrainedConfig) -> str | None:
    """What the model is when it is not a decoder-only causal LM; None when it is one. Only the configs of models
    that can be either (BERT, T5, BART...) carry ``is_decoder``, False unless set."""
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder"
    if getattr(config, "is_decoder", True) is False:
        return "an encoder"
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "not a causal LM in transformers"
    return None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0]
