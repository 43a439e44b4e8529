"""Load only a span of a causal LM's decoder blocks (on a server), or only its embeddings, final norm
and head (on a client), straight from the checkpoint's safetensors files.

A server holding blocks ``start:end`` never materialises the rest of the model, so a peer with a
small GPU can serve a slice of a model it could not load whole. Rotary position embeddings are
recomputed on each server from the absolute positions the client names, so no server needs another's
state. Adding a model family is one :data:`FAMILIES` entry, provided its decoder layer takes
``(hidden_states, attention_mask, position_embeddings, cache)`` like Llama's.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding


@dataclass(frozen=True)
class ModelFamily:
    """Where a family keeps its parts, and which transformers classes build them."""

    layer: type[nn.Module]
    rotary: type[nn.Module]
    norm: type[nn.Module]
    layer_prefix: str = "model.layers."
    embed_key: str = "model.embed_tokens.weight"
    norm_key: str = "model.norm.weight"
    head_key: str = "lm_head.weight"


FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily(LlamaDecoderLayer, LlamaRotaryEmbedding, LlamaRMSNorm),
}


class ShardLoadError(ValueError):
    """The checkpoint or the span cannot be served (unknown family, span outside the model)."""


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder as is; a hub id through the local Hugging Face cache (configs and safetensors only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(name_or_path, revision=revision, allow_patterns=["*.json", "*.safetensors"])
    )


def load_config(model_dir: Path) -> tuple[PretrainedConfig, ModelFamily]:
    config = AutoConfig.from_pretrained(model_dir)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ShardLoadError(
            f"model.name_or_path: model type {config.model_type!r} cannot be sharded yet "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    # the same attention kernel as a local from_pretrained model, so remote and local results agree
    config._attn_implementation = "sdpa"
    return config, family


def read_tensors(model_dir: Path, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors whose names pass ``wanted``, opening only the files that hold them."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({file for name, file in weight_map.items() if wanted(name)})
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(model_dir / file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if wanted(name):
                    tensors[name] = f.get_tensor(name)
    return tensors


def causal_mask(queries: int, past: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask ``[1, 1, queries, past + queries]``: query ``i`` sees keys ``0 … past + i``.

    Explicit rather than ``is_causal``, because a chunk of several tokens after a cached prefix (a
    replay onto a replica) needs the offset."""
    keys = torch.arange(past + queries, device=device)
    allowed = keys[None, :] <= (past + torch.arange(queries, device=device))[:, None]
    mask = torch.zeros(queries, past + queries, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


class BlockSpan(nn.Module):
    """Decoder blocks ``start:end`` of a model, run on hidden states at absolute positions."""

    def __init__(self, config: PretrainedConfig, family: ModelFamily, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ShardLoadError(
                f"blocks: {start}:{end} is not a span of the model's {config.num_hidden_layers} blocks"
            )
        self.config, self.start, self.end = config, start, end
        # layer_idx counts from the span's start: it indexes this span's own attention cache
        self.layers = nn.ModuleList(family.layer(config, layer_idx=i) for i in range(end - start))
        self.rotary = family.rotary(config)
        # transformers renamed the layers' cache argument (past_key_values → cache); an unknown name
        # would be swallowed by **kwargs and the cache silently ignored, so ask the signature
        parameters = inspect.signature(family.layer.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    def forward(
        self,
        hidden: torch.Tensor,
        position_offset: int = 0,
        cache: DynamicCache | None = None,
        blocks: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``hidden`` ``[batch, tokens, hidden_size]`` at positions ``position_offset …`` through
        ``blocks`` (absolute ``start, end`` within this span; default: all of it). With a ``cache``,
        it must already hold exactly ``position_offset`` tokens of these blocks (the server checks)."""
        first, last = blocks if blocks is not None else (self.start, self.end)
        tokens = hidden.shape[1]
        past = position_offset if cache is not None else 0
        positions = torch.arange(position_offset, position_offset + tokens, device=hidden.device)[None]
        position_embeddings = self.rotary(hidden, positions)
        mask = causal_mask(tokens, past, hidden.dtype, hidden.device)
        for layer in self.layers[first - self.start : last - self.start]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                use_cache=cache is not None,
                **{self._cache_argument: cache},
            )
        return hidden


def load_block_span(model_dir: Path, start: int, end: int, dtype: torch.dtype = torch.float32) -> BlockSpan:
    """Blocks ``start:end`` with their checkpoint weights, and nothing else of the model."""
    config, family = load_config(model_dir)
    span = BlockSpan(config, family, start, end)
    prefix = family.layer_prefix

    def in_span(name: str) -> bool:
        index = name[len(prefix) :].split(".", 1)[0] if name.startswith(prefix) else ""
        return index.isdigit() and start <= int(index) < end

    state = {}
    for name, tensor in read_tensors(model_dir, in_span).items():
        index, rest = name[len(prefix) :].split(".", 1)
        state[f"layers.{int(index) - start}.{rest}"] = tensor
    missing, unexpected = span.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("rotary.")]
    if missing or unexpected:
        raise ShardLoadError(f"checkpoint does not match blocks {start}:{end}: missing {missing[:4]}")
    return span.to(dtype).eval().requires_grad_(False)


class ClientParts(nn.Module):
    """What a client keeps locally: token embeddings, final norm and the LM head (tied or not)."""

    def __init__(self, config: PretrainedConfig, family: ModelFamily):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight


def load_client_parts(model_dir: Path, dtype: torch.dtype = torch.float32) -> ClientParts:
    config, family = load_config(model_dir)
    parts = ClientParts(config, family)
    keys = {family.embed_key: "embed_tokens.weight", family.norm_key: "norm.weight"}
    if not config.tie_word_embeddings:
        keys[family.head_key] = "lm_head.weight"
    tensors = read_tensors(model_dir, lambda name: name in keys)
    parts.load_state_dict({keys[name]: t for name, t in tensors.items()}, strict=False)
    missing = set(keys) - set(tensors)
    if missing:
        raise ShardLoadError(f"checkpoint lacks {sorted(missing)}")
    return parts.to(dtype).requires_grad_(False)
