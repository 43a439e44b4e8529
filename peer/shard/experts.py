"""Experts of a mixture-of-experts causal LM, straight from its safetensors files: one expert's feed-forward
weights for an expert server, or everything but the experts for a trainer.

Experts are named ``<layer>.<expert>`` (``protocols/experts.py``). An expert server loads only its experts'
tensors (as ``blocks.py`` loads only a span's); a trainer builds the model without materialising any expert and
puts a module of its own (``client/remote_experts.py``) where each MoE layer's experts were. Adding a family is
one :data:`MOE_FAMILIES` entry, provided its sparse block calls ``experts(hidden, top_k_index, top_k_weights)``
after its router, as Mixtral's does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.activations import ACT2FN

from potluck.peer.shard.blocks import ShardLoadError, read_tensors
from potluck.protocols.runspec import RunSpec


@dataclass(frozen=True)
class MoEFamily:
    """Where a family's checkpoint keeps each expert's weights (as written by ``save_pretrained``: one tensor per
    expert and projection) and its sparse block (the module's name differs from the checkpoint's in transformers
    5, which fuses the experts in memory)."""

    checkpoint_block: str
    """The sparse block under ``model.layers.<i>.`` in the checkpoint."""
    module_block: str
    """The sparse block's attribute on a decoder layer."""
    gate: str = "w1"
    down: str = "w2"
    up: str = "w3"
    count: str = "num_local_experts"
    """The config field with the experts per layer."""

    def expert_key(self, layer: int, expert: int, projection: str) -> str:
        return f"model.layers.{layer}.{self.checkpoint_block}.experts.{expert}.{projection}.weight"


MOE_FAMILIES: dict[str, MoEFamily] = {"mixtral": MoEFamily("block_sparse_moe", "mlp")}
"""By ``config.model_type``. Not yet: Qwen2-MoE (a shared expert beside the routed ones), OLMoE."""


def moe_config(model_dir: Path) -> tuple[PretrainedConfig, MoEFamily]:
    config = AutoConfig.from_pretrained(model_dir)
    family = MOE_FAMILIES.get(config.model_type)
    if family is None:
        raise ShardLoadError(
            f"model.name_or_path: model type {config.model_type!r} has no experts to serve "
            f"(mixtures of experts supported: {', '.join(sorted(MOE_FAMILIES))})"
        )
    config._attn_implementation = "sdpa"  # as a local from_pretrained model, so results agree
    return config, family


def serves_experts(spec: RunSpec) -> bool:
    """Whether the run's model is a mixture of experts whose experts expert servers serve (else block spans). Reads
    the model's config alone."""
    config = AutoConfig.from_pretrained(spec.model.name_or_path, revision=spec.model.revision)
    return config.model_type in MOE_FAMILIES


def num_experts(config: PretrainedConfig) -> int:
    return getattr(config, MOE_FAMILIES[config.model_type].count)


def parse_experts(text: str, config: PretrainedConfig) -> list[tuple[int, int]]:
    """``--experts``: comma-separated ``E``, ``A-B`` (those experts of every MoE layer) or ``L:E``, ``L:A-B``
    (of layer ``L``) → sorted (layer, expert) pairs; ValueError naming the flag otherwise."""
    layers, experts = config.num_hidden_layers, num_experts(config)

    def numbers(part: str, limit: int, what: str) -> range:
        first, _, last = part.partition("-")
        try:
            start, end = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"--experts: {text!r}: expected E, A-B, L:E or L:A-B, comma-separated") from None
        if not 0 <= start <= end < limit:
            raise ValueError(f"--experts: {what} {part!r} is not within 0-{limit - 1}")
        return range(start, end + 1)

    chosen: set[tuple[int, int]] = set()
    for item in text.split(","):
        layer_part, _, expert_part = item.strip().rpartition(":")
        which = numbers(layer_part, layers, "layer") if layer_part else range(layers)
        chosen |= {(layer, e) for layer in which for e in numbers(expert_part, experts, "expert")}
    return sorted(chosen)


class ExpertFFN(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, on ``[tokens, hidden]``."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(hidden)) * self.up(hidden))


def load_experts(
    model_dir: Path, uids: list[tuple[int, int]], dtype: torch.dtype = torch.float32
) -> dict[tuple[int, int], ExpertFFN]:
    """The experts ``uids`` with their checkpoint weights, and nothing else of the model."""
    config, family = moe_config(model_dir)
    names = {
        family.expert_key(layer, expert, projection): (layer, expert, attribute)
        for layer, expert in uids
        for attribute, projection in (("gate", family.gate), ("up", family.up), ("down", family.down))
    }
    tensors = read_tensors(model_dir, lambda name: name in names)
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ShardLoadError(
            f"model.name_or_path: the checkpoint lacks {missing[:3]} (not a {config.model_type} one?)"
        )
    experts = {uid: ExpertFFN(config) for uid in uids}
    for name, tensor in tensors.items():
        layer, expert, attribute = names[name]
        getattr(experts[(layer, expert)], attribute).weight.data.copy_(tensor)
    return {uid: expert.to(dtype).eval() for uid, expert in experts.items()}


def load_without_experts(
    model_dir: Path, experts_of: Callable[[int], nn.Module], dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The causal LM with every MoE layer's experts replaced by ``experts_of(layer)`` (called like the family's
    experts module: ``(hidden [tokens, hidden], top_k_index, top_k_weights) → [tokens, hidden]``): attention,
    embeddings, norms, routers and head with their checkpoint weights; no expert tensor is read or allocated."""
    config, family = moe_config(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for index, layer in enumerate(model.model.layers):
        getattr(layer, family.module_block).experts = experts_of(index)
    model.to_empty(device="cpu")
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(
        config
    )  # its buffers are computed, not saved: to_empty left them void
    block = f".{family.checkpoint_block}."
    tensors = read_tensors(model_dir, lambda name: ".experts." not in name)
    state = {name.replace(block, f".{family.module_block}."): tensor for name, tensor in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise ShardLoadError(f"model.name_or_path: checkpoint does not match the model: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")  # fmt: skip
    return model.to(dtype)
