"""Build the bundled tiny Llama-style model and its tokenizer, saved with ``save_pretrained``.

The result is an ordinary Hugging Face folder: peers load it with ``from_pretrained`` exactly as they
would load a hub model, so the demo and tests exercise the real loading path without downloads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# A minimal chat template so that TRL's "messages" format works with the tiny tokenizer too.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
)


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
        """The sizes under the names every transformers config class uses (Llama's, and BERT's for
        ``tools/tiny/encoder.py``)."""
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "max_position_embeddings": self.max_positions,
        }


def train_tokenizer(corpus: Iterable[str], alphabet: str) -> PreTrainedTokenizerFast:
    """Train a character-level BPE tokenizer (no merges beyond the alphabet) with ``tokenizers``."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    extra = sorted(set("abcdefghijklmnopqrstuvwxyz: ") - set(alphabet))
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(alphabet) + len(extra),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=list(alphabet) + extra,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: Path, corpus: Iterable[str], alphabet: str, config: TinyModelConfig) -> Path:
    """Write a randomly initialised tiny Llama and its tokenizer to ``out_dir``; return the folder."""
    tokenizer = train_tokenizer(corpus, alphabet)
    torch.manual_seed(config.seed)
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        **config.transformer_sizes(),
        num_key_value_heads=config.num_kv_heads,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(llama_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
