"""Frozen base weights in 8 or 4 bits (``model.quantization``), with bitsandbytes, for trainers and shard servers.

A trainer loads its causal LM through transformers' bitsandbytes integration (:func:`bitsandbytes_config`) and
prepares it as QLoRA does (peft's ``prepare_model_for_kbit_training``); a shard server reads its span of blocks
from the safetensors files itself, so :func:`quantize_linears` swaps the span's ``nn.Linear`` layers for
bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` built from the loaded weights, with the options transformers would
use. Either way peft then wraps the quantised layers with adapters in full precision, of the same shapes and names
as over an unquantised base: peers that quantise and peers that do not average the same tensors.

bitsandbytes is optional (the ``quant`` extra): :func:`check_quantization` says so in one line naming the field
before anything loads. Its CPU backend (0.49 and later) runs 8-bit and 4-bit layers forward and backward, so this
works on CPU too, though slower than float32 there: the point of quantising is memory on a GPU.

On CPUs with AVX512-BF16, importing bitsandbytes would ask the Hugging Face hub for a CPU 4-bit kernel;
``runtime/hub_kernels.py`` hooks its import, in every peer, to go without that (its own kernel instead).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from potluck.protocols.runspec import ModelSpec

QUANT_EXTRA = "potluck[quant]"


class QuantizationUnavailableError(RuntimeError):
    """``model.quantization`` asks for what this machine cannot do; ``str()`` is one line naming the field."""


def check_quantization(spec: ModelSpec) -> None:
    """Fail, naming ``model.quantization``, when the spec quantises and bitsandbytes is not installed here."""
    if spec.quantized and importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailableError(
            f"model.quantization: {spec.quantization.kind!r} needs bitsandbytes, which is not installed here: "
            f"pip install '{QUANT_EXTRA}' (or set quantization kind none)"
        )


def compute_dtype(spec: ModelSpec) -> torch.dtype:
    """The dtype 4-bit weights are dequantised to for each product (``compute_dtype``, else the model's)."""
    return getattr(torch, spec.quantization.compute_dtype or spec.dtype)


def bitsandbytes_config(spec: ModelSpec):
    """transformers' ``BitsAndBytesConfig`` for ``spec`` (None when it does not quantise)."""
    if not spec.quantized:
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization.kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quantization.quant_type,
        bnb_4bit_use_double_quant=spec.quantization.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(spec),
    )


def prepare_for_training(model: nn.Module) -> nn.Module:
    """QLoRA's preparation of a quantised model: every base weight frozen, float16/bfloat16 norms and embeddings
    upcast to float32 for stable training. No gradient checkpointing: the run spec has no such option, and a
    quantised peer should compute what an unquantised one does."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def quantize_linears(module: nn.Module, spec: ModelSpec, device: torch.device) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` by its bitsandbytes counterpart on ``device`` (quantised
    there, one layer at a time, so a GPU never holds more than one layer in full precision); returns ``module``,
    unchanged when ``spec`` does not quantise, marked as peft expects of a quantised model otherwise (peft then
    wraps the layers with its bitsandbytes LoRA layers). Other parameters stay where they are."""
    if not spec.quantized:
        return module
    import bitsandbytes as bnb

    def quantized(linear: nn.Linear) -> nn.Module:
        weight = linear.weight.data.to(
            "cpu"
        )  # bitsandbytes quantises a host tensor as it moves to the device
        if spec.quantization.kind == "8bit":  # BitsAndBytesConfig's defaults: int8 weights, outliers over 6.0
            layer = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, linear.bias is not None, has_fp16_weights=False,
                threshold=6.0, device="cpu",
            )  # fmt: skip
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            options = {
                "quant_type": spec.quantization.quant_type,
                "compress_statistics": spec.quantization.double_quant,
            }
            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, linear.bias is not None,
                compute_dtype=compute_dtype(spec), device="cpu", **options,
            )  # fmt: skip
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, module=layer, **options)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return layer.to(device)

    for child in list(module.modules()):
        for attribute, linear in list(child.named_children()):
            if type(linear) is nn.Linear:
                setattr(child, attribute, quantized(linear))
    module.is_loaded_in_8bit = spec.quantization.kind == "8bit"
    module.is_loaded_in_4bit = spec.quantization.kind == "4bit"
    return module


def held_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored, with the quantisation constants of quantised
    weights (a 4-bit weight: its packed bytes, block scales and, double-quantised, their scales)."""
    tensors = [*module.parameters(), *module.buffers()]
    for parameter in module.parameters():
        state = getattr(parameter, "quant_state", None)  # Params4bit
        if state is not None:
            tensors += [t for t in state.as_dict(packed=True).values() if isinstance(t, torch.Tensor)]
        scales = getattr(parameter, "SCB", None)  # Int8Params: one scale per row
        if isinstance(scales, torch.Tensor):
            tensors.append(scales)
    return sum(t.numel() * t.element_size() for t in tensors)


def base_parameter(module: nn.Module) -> nn.Parameter:
    """A frozen parameter of ``module`` in the dtype and on the device its activations use: the first frozen
    floating-point one (quantised weights are stored as integers; adapters may be float32 over a bfloat16
    base)."""
    return next(p for p in module.parameters() if p.is_floating_point() and not p.requires_grad)
