"""Load only a span of a causal LM's decoder blocks (on a server), or only its embeddings, final norm
and head (on a client), straight from the checkpoint's safetensors files.

A server holding blocks ``start:end`` never materialises the rest of the model, so a peer with a
small GPU can serve a slice of a model it could not load whole. Rotary position embeddings are
recomputed on each server from the absolute positions the client names, so no server needs another's
state; so is the attention mask, from the positions, each layer's sliding window and the rows' left
padding. Adding a model family is one :data:`FAMILIES` entry, provided its decoder layer takes
``(hidden_states, attention_mask, position_embeddings, cache)`` like Llama's.
"""

from __future__ import annotations

import importlib
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


@dataclass(frozen=True)
class ModelFamily:
    """Where a family keeps its parts, and which transformers classes build them: ``<prefix>DecoderLayer``,
    ``<prefix>RotaryEmbedding`` and ``<prefix>RMSNorm`` of ``transformers.models.<module>``."""

    module: str
    prefix: str
    scaled_embeddings: bool = False
    """Embeddings are multiplied by √hidden_size (Gemma's ``…ScaledWordEmbedding``)."""
    layer_prefix: str = "model.layers."
    embed_key: str = "model.embed_tokens.weight"
    norm_key: str = "model.norm.weight"
    head_key: str = "lm_head.weight"

    def part(self, name: str) -> type[nn.Module]:
        modeling = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(modeling, f"{self.prefix}{name}")


FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily("llama", "Llama"),
    "mistral": ModelFamily("mistral", "Mistral"),
    "qwen2": ModelFamily("qwen2", "Qwen2"),
    "qwen3": ModelFamily("qwen3", "Qwen3"),
    "gemma3_text": ModelFamily("gemma3", "Gemma3", scaled_embeddings=True),
}
"""By ``config.model_type``. Not yet: Gemma 2 (logit soft-capping inside attention), mixtures of experts."""


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
    if getattr(config, "attn_logit_softcapping", None):
        # sdpa cannot soft-cap attention logits: remote results would differ from the model's own
        raise ShardLoadError("model.name_or_path: attention logit soft-capping cannot be sharded yet")
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


def attention_mask(
    queries: int,
    past: int,
    dtype: torch.dtype,
    device: torch.device,
    window: int | None = None,
    padding: torch.Tensor | None = None,
    pads_from: int = 0,
) -> torch.Tensor:
    """Additive mask ``[rows or 1, 1, queries, past + queries]``: query ``i`` sees keys ``0 … past + i``,
    only the last ``window`` of them with a sliding window (as transformers: ``query - key < window``),
    and none of a row's ``padding`` left pads, which start at key ``pads_from`` (after a prefix; the pads
    themselves see only themselves, so that their outputs, which nobody reads, stay finite).

    Explicit rather than ``is_causal``, because a chunk of several tokens after a cached prefix (a
    replay onto a replica) needs the offset."""
    keys = torch.arange(past + queries, device=device)[None, :]
    query_positions = (past + torch.arange(queries, device=device))[:, None]
    allowed = keys <= query_positions
    if window is not None:
        allowed = allowed & (query_positions - keys < window)
    allowed = allowed[None]  # [1, queries, keys]
    if padding is not None:
        first, after = pads_from, pads_from + padding.to(device)[:, None, None]
        is_pad = (keys[None] >= first) & (keys[None] < after)
        allowed = (allowed & ~is_pad) | ((keys == query_positions)[None] & (query_positions[None] < after))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class BlockSpan(nn.Module):
    """Decoder blocks ``start:end`` of a model, run on hidden states at absolute positions."""

    def __init__(self, config: PretrainedConfig, family: ModelFamily, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ShardLoadError(
                f"blocks: {start}:{end} is not a span of the model's {config.num_hidden_layers} blocks"
            )
        self.config, self.start, self.end = config, start, end
        layer_class, rotary_class = family.part("DecoderLayer"), family.part("RotaryEmbedding")
        # built as the model's layers start…end-1 (their kind: sliding or full attention), but each
        # indexes this span's own attention cache from 0
        self.layers = nn.ModuleList(layer_class(config, layer_idx=start + i) for i in range(end - start))
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = i
        self.rotary = rotary_class(config)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        self.layer_types = layer_types[start:end]
        """Each layer's kind; Gemma 3's rotary embedding differs by kind (local and global)."""
        self.windows = [
            getattr(layer.self_attn, "sliding_window", getattr(config, "sliding_window", None))
            for layer in self.layers
        ]
        """Each layer's sliding window (None: it sees every earlier token): Qwen's and Gemma's sliding
        layers name theirs, Mistral's apply the config's to every layer."""
        self._rotary_by_kind = "layer_type" in inspect.signature(rotary_class.forward).parameters
        # transformers renamed the layers' cache argument (past_key_values → cache); an unknown name
        # would be swallowed by **kwargs and the cache silently ignored, so ask the signature
        parameters = inspect.signature(layer_class.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    def prefilled_cache(self, prefix: torch.Tensor, blocks: tuple[int, int], rows: int) -> DynamicCache:
        """A cache holding a prefix's keys and values (prefix tuning, as peft's: before rotary, shared by every
        row) for ``blocks``: ``prefix`` ``[blocks, 2, key-value heads, tokens, head size]``. Differentiable in
        ``prefix``."""
        cache = DynamicCache()
        for index, (keys, values) in zip(
            range(blocks[0] - self.start, blocks[1] - self.start), prefix, strict=True
        ):
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)
        return cache

    def forward(
        self,
        hidden: torch.Tensor,
        position_offset: int = 0,
        cache: DynamicCache | None = None,
        blocks: tuple[int, int] | None = None,
        padding: torch.Tensor | None = None,
        prefix_tokens: int = 0,
    ) -> torch.Tensor:
        """``hidden`` ``[batch, tokens, hidden_size]`` at positions ``position_offset …`` through
        ``blocks`` (absolute ``start, end`` within this span; default: all of it). With a ``cache``,
        it must already hold exactly ``position_offset`` tokens of these blocks (the server checks).
        ``padding``: each row's count of left pads (``[batch]``, int; None: no padding), which its
        tokens do not attend to and its positions do not count, as transformers' left-padded batches; they
        come after the ``prefix_tokens`` the cache starts with (prefix tuning), if any."""
        first, last = blocks if blocks is not None else (self.start, self.end)
        tokens = hidden.shape[1]
        past = position_offset if cache is not None else 0
        positions = torch.arange(position_offset, position_offset + tokens, device=hidden.device)[None]
        if padding is not None:
            positions = (positions - padding.to(hidden.device)[:, None]).clamp_(min=0)
        rotary: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        masks: dict[int | None, torch.Tensor] = {}
        for index in range(first - self.start, last - self.start):
            kind, window = self.layer_types[index], self.windows[index]
            if kind not in rotary:
                by_kind = {"layer_type": kind} if self._rotary_by_kind else {}
                rotary[kind] = self.rotary(hidden, positions, **by_kind)
            if window not in masks:
                masks[window] = attention_mask(
                    tokens, past, hidden.dtype, hidden.device, window, padding, pads_from=prefix_tokens
                )
            hidden = self.layers[index](
                hidden,
                attention_mask=masks[window],
                position_embeddings=rotary[kind],
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
        self.embed_scale = config.hidden_size**0.5 if family.scaled_embeddings else 1.0
        self.norm = family.part("RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        # Gemma scales in the embeddings' dtype, as its ScaledWordEmbedding does
        return (
            embeds * torch.tensor(self.embed_scale, dtype=embeds.dtype) if self.embed_scale != 1.0 else embeds
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


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
