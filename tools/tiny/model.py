"""Build the bundled tiny model and its tokenizer, saved with ``save_pretrained``: a Llama by default, or a tiny
model of another family (``tools/tiny/families.py``: Qwen2, Qwen3, Mistral, Gemma 3) with a tokenizer and chat
template of that family's shape.

The result is an ordinary Hugging Face folder: peers load it with ``from_pretrained`` exactly as they
would load a hub model, so the demo and tests exercise the real loading path without downloads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from potluck.tools.tiny.families import FAMILIES, TinyFamily


@dataclass(frozen=True)
class TinyModelConfig:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    """Fewer key/value heads than query heads: grouped-query attention, as real Llama checkpoints use."""
    intermediate_size: int = 256
    max_positions: int = 64
    seed: int = 0

    def transformer_sizes(self) -> dict[str, int]:
        """The sizes under the names every transformers config class uses (each family's, and BERT's for
        ``tools/tiny/encoder.py``)."""
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "max_position_embeddings": self.max_positions,
        }


def train_tokenizer(corpus: Iterable[str], alphabet: str, family: str = "llama") -> PreTrainedTokenizerFast:
    """A BPE tokenizer without merges, with the special tokens, BOS behaviour and chat template of ``family``:
    character-level, trained with ``tokenizers`` over ``alphabet`` (and what the chat template writes), or the
    family's byte-level one (``TinyFamily.byte_level_class``)."""
    shape = FAMILIES[family]
    named = {"pad_token": shape.pad, "bos_token": shape.bos, "eos_token": shape.eos, "unk_token": shape.unk}
    named = {name: token for name, token in named.items() if token is not None}
    if shape.turn_tokens:
        named["extra_special_tokens"] = list(shape.turn_tokens)
    if shape.byte_level_class is not None:
        pieces = [*shape.special_tokens, *sorted(pre_tokenizers.ByteLevel.alphabet())]
        fast = shape.byte_level_class(vocab={piece: i for i, piece in enumerate(pieces)}, merges=[], **named)
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=_character_level(corpus, alphabet, shape), **named)
    fast.chat_template = shape.chat_template
    return fast


def _character_level(corpus: Iterable[str], alphabet: str, shape: TinyFamily) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=shape.unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    extra = sorted(set("abcdefghijklmnopqrstuvwxyz: " + shape.template_characters) - set(alphabet))
    trainer = trainers.BpeTrainer(
        vocab_size=len(shape.special_tokens) + len(alphabet) + len(extra),
        special_tokens=list(shape.special_tokens),
        initial_alphabet=list(alphabet) + extra,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if shape.adds_bos:
        bos = (shape.bos, tokenizer.token_to_id(shape.bos))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{shape.bos} $A", pair=f"{shape.bos} $A {shape.bos} $B:1", special_tokens=[bos]
        )
    return tokenizer


def model_config(shape: TinyFamily, config: TinyModelConfig, tokenizer) -> PretrainedConfig:
    """``shape``'s config class at the tiny sizes, with the tokenizer's special token ids."""
    return shape.config_class(
        vocab_size=len(tokenizer),
        **config.transformer_sizes(),
        num_key_value_heads=config.num_kv_heads,
        tie_word_embeddings=shape.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape.extra_config(config),
    )


def build_tiny_model(
    out_dir: Path, corpus: Iterable[str], alphabet: str, config: TinyModelConfig, family: str = "llama"
) -> Path:
    """Write a randomly initialised tiny model of ``family`` (``FAMILIES``) and its tokenizer to ``out_dir``;
    return the folder."""
    shape = FAMILIES[family]
    tokenizer = train_tokenizer(corpus, alphabet, family)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(model_config(shape, config, tokenizer))
    if shape.turn_end is not None:  # as the family's instruct checkpoints do: a chat turn ends generation too
        model.generation_config.eos_token_id = [
            tokenizer.eos_token_id,
            tokenizer.convert_tokens_to_ids(shape.turn_end),
        ]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
