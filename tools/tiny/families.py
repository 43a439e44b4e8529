"""The model families the bundled tiny model comes in: each family's transformers config class and the shape of its
tokenizer (special tokens, whether it adds a BOS, chat template), so that tests meet the layouts real checkpoints
have without downloading one.

The templates are the families' own, cut to plain role/content turns (no tools, no thinking blocks, no default
system prompt), in the tiny tokenizer's alphabet:

- ``llama``: the bundled tiny model as it always was (a minimal template, EOS after each assistant turn);
- ``qwen2``, ``qwen3``: ChatML (``<|im_start|>role\\n…<|im_end|>\\n``), no BOS at all, EOS ``<|im_end|>`` and pad
  ``<|endoftext|>`` as in Qwen's instruct checkpoints, and Qwen's byte-level tokenizer (``Qwen2Tokenizer``: every
  byte in the vocabulary, no unknown token); Qwen3 adds a norm on queries and keys;
- ``mistral``: v0.3's ``<s>[INST] …[/INST] …</s>`` with ``[INST]`` and ``[/INST]`` control tokens, no pad token,
  untied embeddings;
- ``mixtral``: a mixture of experts (``MixtralForCausalLM``) with Mistral's tokenizer and template: every
  block's feed-forward layer is 4 experts, 2 per token, and the config asks for the router's load-balancing loss
  (``output_router_logits``), so ``.loss`` includes it as Mixtral's training does (``peer/shard/experts/``);
- ``gemma3``: Gemma 3's text model (``Gemma3ForCausalLM``, the 1B checkpoint's class) and template,
  ``<bos><start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n``, whose turns end with ``<end_of_turn>``
  rather than EOS (its generation config stops at both); sliding-window and global layers alternate, and the
  window is shorter than the tests' sequences so that both kinds of attention are exercised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import (
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen2Tokenizer,
    Qwen3Config,
)

LLAMA_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
)
"""A minimal chat template so that TRL's "messages" format works with the tiny tokenizer too."""

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ ' ' + (m['content'] | trim) + eos_token }}{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
    "{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set prefix = '' %}{% endif %}"
    "{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
    " + (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def _per_head(sizes) -> dict[str, Any]:
    """An explicit head size, for the config classes whose default is a real checkpoint's (128 or 256)."""
    return {"head_dim": sizes.hidden_size // sizes.num_heads}


def _mixtral(sizes) -> dict[str, Any]:
    return {**_per_head(sizes), "sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2,
            "output_router_logits": True}  # fmt: skip


def _gemma3(sizes) -> dict[str, Any]:
    pattern = ("sliding_attention", "full_attention")
    return {
        **_per_head(sizes),
        "query_pre_attn_scalar": sizes.hidden_size // sizes.num_heads,
        "layer_types": [pattern[i % 2] for i in range(sizes.num_layers)],
        "sliding_window": 8,
    }


@dataclass(frozen=True)
class TinyFamily:
    """What a tiny model of one family is built from."""

    config_class: type[PretrainedConfig]
    special_tokens: tuple[str, ...]
    """In id order, from 0."""
    eos: str
    pad: str | None
    bos: str | None
    unk: str | None
    chat_template: str
    turn_tokens: tuple[str, ...] = ()
    """Special tokens of the chat template (not BOS, EOS, pad or unk)."""
    turn_end: str | None = None
    """The token that ends a chat turn when it is not EOS; the model's generation config stops at it too."""
    adds_bos: bool = False
    """``tokenizer(text)`` puts BOS in front, as Mistral's and Gemma's tokenizers do (the bundled Llama's does not)."""
    template_characters: str = ""
    """Characters the chat template writes beyond letters, ``:`` and space (they must be in the vocabulary)."""
    byte_level_class: type | None = None
    """The family's byte-level BPE tokenizer class (Qwen's), made with every byte and the special tokens as its
    vocabulary; None: a character-level BPE over the task's alphabet. NOTE: transformers 5 loads the tokenizer of a
    ``qwen2`` model as ``Qwen2Tokenizer`` whatever its folder says, rebuilt byte-level from the vocabulary, so a
    character-level vocabulary would lose its spaces and newlines there."""
    tie_word_embeddings: bool = True
    extra_config: Callable[[Any], dict[str, Any]] = field(default=lambda sizes: {})
    """Config arguments beyond the shared sizes, given the ``TinyModelConfig``."""


QWEN_TOKENS = {"special_tokens": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "eos": "<|im_end|>",
               "pad": "<|endoftext|>", "bos": None, "unk": None, "chat_template": CHATML_TEMPLATE,
               "turn_tokens": ("<|im_start|>",), "byte_level_class": Qwen2Tokenizer}  # fmt: skip

MISTRAL_TOKENS = {"special_tokens": ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "eos": "</s>", "pad": None,
                  "bos": "<s>", "unk": "<unk>", "chat_template": MISTRAL_TEMPLATE,
                  "turn_tokens": ("[INST]", "[/INST]"), "adds_bos": True, "tie_word_embeddings": False}  # fmt: skip

FAMILIES: dict[str, TinyFamily] = {
    "llama": TinyFamily(
        LlamaConfig, ("<pad>", "<s>", "</s>", "<unk>"), eos="</s>", pad="<pad>", bos="<s>", unk="<unk>",
        chat_template=LLAMA_CHAT_TEMPLATE,
    ),
    "qwen2": TinyFamily(Qwen2Config, **QWEN_TOKENS),
    "qwen3": TinyFamily(Qwen3Config, **QWEN_TOKENS, extra_config=_per_head),
    "mistral": TinyFamily(
        MistralConfig, **MISTRAL_TOKENS, extra_config=lambda sizes: {"sliding_window": None},
    ),
    "mixtral": TinyFamily(MixtralConfig, **MISTRAL_TOKENS, extra_config=_mixtral),
    "gemma3": TinyFamily(
        Gemma3TextConfig, ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), eos="<eos>",
        pad="<pad>", bos="<bos>", unk="<unk>", chat_template=GEMMA_TEMPLATE,
        turn_tokens=("<start_of_turn>", "<end_of_turn>"), turn_end="<end_of_turn>", adds_bos=True,
        template_characters="\n", extra_config=_gemma3,
    ),
}  # fmt: skip
"""Every family the tiny model can be built in, by name (``build_tiny_model(family=...)``)."""
