"""Build a tiny BERT-style encoder and its own WordPiece tokenizer, saved with ``save_pretrained``.

The reward-model stage accepts any ``AutoModelForSequenceClassification`` backbone, with a tokenizer other than
the policy's. This encoder is that case built locally: no EOS token (an encoder's tokenizer frames a sequence as
``[CLS] ... [SEP]``), a pooler over ``[CLS]``, and whole numbers as tokens where the tiny Llama reads
characters. Tests load it with ``from_pretrained`` like a hub checkpoint, without downloads.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, BertTokenizerFast

from potluck.tools.tiny.model import TinyModelConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(corpus: Iterable[str]) -> BertTokenizerFast:
    """A BERT-style tokenizer made with ``tokenizers``: lowercasing normaliser, whitespace and punctuation
    pre-tokenizer, WordPiece over a vocabulary of every word of ``corpus`` (for the arithmetic task: the numbers,
    ``+`` and ``=``) plus single characters and ``##`` pieces to spell anything else, and the ``[CLS] $A [SEP]``
    template. The vocabulary is listed, not trained (WordPiece's trainer breaks ties differently from run to run),
    so the same corpus always gives the same token ids."""
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = {word for text in corpus for word, _ in pre_tokenizer.pre_tokenize_str(text.lower())}
    characters = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    pieces = [*SPECIAL_TOKENS, *characters, *(f"##{c}" for c in characters)]
    pieces += sorted(words - set(pieces), key=lambda w: (len(w), w))
    tokenizer = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(pieces)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", pieces.index("[CLS]")), ("[SEP]", pieces.index("[SEP]"))],
    )
    return BertTokenizerFast(tokenizer_object=tokenizer)


def build_tiny_encoder(out_dir: Path, corpus: Iterable[str], config: TinyModelConfig | None = None) -> Path:
    """Write a randomly initialised tiny BERT (with its pooler) and its WordPiece tokenizer to ``out_dir``, of the
    tiny Llama's sizes (``config.num_kv_heads`` does not apply: BERT has no grouped-query attention)."""
    config = config or TinyModelConfig()
    tokenizer = wordpiece_tokenizer(corpus)
    torch.manual_seed(config.seed)
    model = BertModel(
        BertConfig(
            vocab_size=len(tokenizer), **config.transformer_sizes(), pad_token_id=tokenizer.pad_token_id
        )
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
