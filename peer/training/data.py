"""Datasets in TRL's formats, tokenised for causal-LM training, and each peer's own stream of them.

Formats (picked by ``data.format`` or, with ``auto``, by the columns of the first row):
``prompt_completion`` (loss on the completion only; either may be a conversation, TRL's conversational
format), ``messages`` (chat; loss on the last assistant turn), ``text`` (loss on every token).

Every format, and the preference and prompt-only rows of the RLHF stages, is laid out by one path,
:func:`encode_turns`: exactly one BOS, conversations through the chat template once (:func:`encode_prompt`).
Rows that ``data.max_length`` leaves without a completion token are skipped with a warning; when that is more
than half of them the data is refused (:func:`check_truncation`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from potluck.protocols.runspec import DataSpec

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
MAX_DROPPED_SHARE = 0.5
"""Share of the rows ``data.max_length`` may leave without a completion token (they are skipped with a warning);
above it the data is refused before any model loads."""
FORMAT_COLUMNS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}


class DatasetFormatError(ValueError):
    """The data does not have the columns its format (or stage) needs."""


def load_rows(path: str, split: str = "train") -> list[dict[str, Any]]:
    """Read a local JSONL file, or a Hugging Face ``datasets`` path, into a list of rows."""
    return [row for _, row in numbered_rows(path, split)]


def numbered_rows(path: str, split: str = "train") -> list[tuple[int | None, dict[str, Any]]]:
    """The rows of :func:`load_rows`, each with its line in the JSONL file (``None`` for a ``datasets``
    path). A line that is not a JSON object raises :class:`DatasetFormatError` naming the file and line."""
    local = Path(path)
    if local.suffix in (".jsonl", ".json") or local.exists():
        if not local.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        with local.open("rb") as f:
            return [
                (number, _parse_line(raw, path, number)) for number, raw in enumerate(f, 1) if raw.strip()
            ]
    import datasets  # imported lazily: it is slow to import and only needed for hub datasets

    return [(None, row) for row in datasets.load_dataset(path, split=split)]


def _parse_line(raw: bytes, path: str, number: int) -> dict[str, Any]:
    where = f"{path!r} line {number}"
    try:
        row = json.loads(raw.decode("utf-8").rstrip("\r\n"))
    except UnicodeDecodeError as e:
        raise DatasetFormatError(
            f"{where}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8"
        ) from None
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{where}: not valid JSON ({e.msg} at column {e.pos + 1})") from None
    if not isinstance(row, dict):
        raise DatasetFormatError(f"{where}: expected a JSON object of columns, got {type(row).__name__}")
    return row


def detect_format(row: dict[str, Any], declared: str) -> str:
    if declared != "auto":
        missing = [c for c in FORMAT_COLUMNS[declared] if c not in row]
        if missing:
            raise DatasetFormatError(
                f"data.format={declared!r} needs columns {list(FORMAT_COLUMNS[declared])}; missing {missing} "
                f"(row has {sorted(row)})"
            )
        return declared
    for name, columns in FORMAT_COLUMNS.items():
        if all(c in row for c in columns):
            return name
    raise DatasetFormatError(
        f"cannot tell the data format from columns {sorted(row)}; expected one of "
        + ", ".join(f"{name} {list(cols)}" for name, cols in FORMAT_COLUMNS.items())
    )


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int = 0
    """Tokens before the completion (BOS and prompt), before truncation to ``max_length``."""

    @property
    def has_labels(self) -> bool:
        """False when truncation left no completion token to train on (its loss would be NaN)."""
        return any(label != IGNORE_INDEX for label in self.labels)


Turn = str | list[dict[str, Any]]
"""A prompt or completion: plain text, or a conversation (TRL's conversational format: role/content messages)."""


def row_turns(row: dict[str, Any], fmt: str) -> tuple[Turn, Turn]:
    """(prompt, completion) of a row of any language-modeling format; ``text`` rows have an empty prompt."""
    if fmt == "prompt_completion":
        return row["prompt"], row["completion"]
    if fmt == "messages":
        return row["messages"][:-1], row["messages"][-1:]
    return "", row["text"]


def turn_text(turn: Turn) -> str:
    """A completion as plain text: itself, or the content of its (last) message (exact-match references)."""
    return turn[-1]["content"] if isinstance(turn, list) else str(turn)


def encode_prompt(prompt: Turn, tokenizer) -> list[int]:
    """The prompt's tokens, with exactly one BOS (when the tokenizer has one): the one layout of every prompt, in
    training (every stage), evaluation, ``potluck chat`` and ``potluck generate``.

    A conversation goes through the chat template (assistant turn opened) and is tokenized with
    ``add_special_tokens=False``, as TRL does: the template lays out its own special tokens, BOS included
    (Llama 3's starts with ``{{ bos_token }}``), and adding the tokenizer's would double it. Plain text gets the
    tokenizer's BOS in front, unless it already starts with one (text a template rendered earlier)."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    ids = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def user_prompt(text: str, chat_template: bool) -> Turn:
    """What ``potluck chat`` and ``potluck generate`` send the model: the text as is, or (``--chat-template``) one
    user turn for the chat template (instruct models)."""
    return [{"role": "user", "content": text}] if chat_template else text


def encode_completion(prompt: Turn, completion: Turn, tokenizer) -> list[int]:
    """The completion's tokens, ending the turn: a conversational completion as the chat template renders it after
    the prompt (its own end-of-turn token: ``<|eot_id|>`` for Llama 3, ``<|im_end|>\\n`` for Qwen's ChatML,
    ``<end_of_turn>\\n`` for Gemma; what follows that token is kept, as TRL keeps it), plain text followed by EOS.
    EOS is also added after a template that ends the turn with no special token, or the model would never learn to
    stop."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not isinstance(completion, list):  # EOS unless the text ends with it already (TRL's rule for text too)
        ids = tokenizer(completion, add_special_tokens=False).input_ids
        return ids if eos and ids[-1:] == eos else ids + eos
    history = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    opened = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(history + completion, tokenize=False)
    if not whole.startswith(opened):  # a template that renders the last turn apart from the history
        return tokenizer(turn_text(completion), add_special_tokens=False).input_ids + eos
    ids = tokenizer(whole[len(opened) :], add_special_tokens=False).input_ids
    # a special token anywhere in the rendered turn is the template's own end of turn, even when a newline follows
    # it (ChatML, Gemma): an EOS after that would teach the model to end every turn twice
    special = set(tokenizer.all_special_ids)
    return ids if any(i in special for i in ids) else ids + eos


def encode_turns(
    prompt: Turn, completion: Turn, tokenizer, max_length: int | None = None
) -> TokenizedExample:
    """Prompt and completion as one training sequence, labels on the completion only, truncated to ``max_length``
    (the completion is cut first: a prompt longer than ``max_length`` leaves nothing to train on, see
    ``TokenizedExample.has_labels``)."""
    prompt_ids = encode_prompt(prompt, tokenizer)
    completion_ids = encode_completion(prompt, completion, tokenizer)
    if not prompt and prompt_ids and completion_ids[:1] == prompt_ids:  # a text row that starts with its BOS
        prompt_ids = []
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return TokenizedExample(input_ids, labels, len(prompt_ids))


def tokenize_example(row: dict[str, Any], fmt: str, tokenizer, max_length: int) -> TokenizedExample:
    """A row of any language-modeling format (``FORMAT_COLUMNS``) as tokens and labels."""
    return encode_turns(*row_turns(row, fmt), tokenizer, max_length)


def check_truncation(examples: list, spec: DataSpec) -> None:
    """Warn (one line) about rows whose labels ``data.max_length`` truncated away; refuse the data
    (:class:`DatasetFormatError`, exit code 2 in ``run-peer``) when that is more than ``MAX_DROPPED_SHARE`` of it:
    such a ``max_length`` is a mistake, not a few outliers."""
    dropped = [e for e in examples if not e.has_labels]
    longest = max(e.prompt_tokens for e in dropped)
    where = f"{len(dropped)} of {len(examples)} rows of data.path {spec.path!r}"
    if len(dropped) > MAX_DROPPED_SHARE * len(examples):
        raise DatasetFormatError(
            f"data.max_length={spec.max_length} truncates away every completion token of {where}; raise "
            f"data.max_length above the longest prompt ({longest} tokens)"
        )
    logger.warning(
        f"data.max_length={spec.max_length} truncates away every completion token of {where}: skipping them "
        f"(the longest prompt is {longest} tokens)"
    )


def collate(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        attention_mask[i, : len(e.input_ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def peer_seed(seed: int, peer_id: str) -> int:
    """A data-order seed that differs between peers and is stable for a peer (given ``--identity-path``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{peer_id}".encode()).digest()[:8], "big")


class PeerDataStream:
    """This peer's endless stream of training batches: its own shuffle of the dataset, epoch after epoch.

    Peers in an open swarm do not know how many others there are, so instead of fixed shards each peer
    walks the data in its own order (seeded by the run seed and its peer id): different peers see
    different samples at any moment, and a restarted peer with the same identity replays the same order.
    """

    def __init__(self, spec: DataSpec, tokenizer, batch_size: int, stage_data=None):
        """``stage_data``: a stage's own column check, encoding and collation (``peer/training/stages/data.py``);
        ``None`` for the language-modeling formats above."""
        rows = load_rows(spec.path, spec.split)
        if not rows:
            raise DatasetFormatError(f"data.path {spec.path!r} has no rows")
        self._collate = None
        if stage_data is not None:
            stage_data.check(rows[0], f"data.path {spec.path!r}")
            self.format = "stage"
            encoded = [stage_data.encode(r) for r in rows]
            self._collate = stage_data.collate
        else:
            self.format = detect_format(rows[0], spec.format)
            encoded = [tokenize_example(r, self.format, tokenizer, spec.max_length) for r in rows]
        self.examples = [e for e in encoded if e.has_labels]
        self.dropped = len(encoded) - len(self.examples)
        """Rows left out because ``data.max_length`` truncated away every token they would train on."""
        if self.dropped:
            check_truncation(encoded, spec)
        self.batch_size = batch_size
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    def batches(self, seed: int) -> BatchStream:
        """Endless batches in the order given by ``seed`` (see :func:`peer_seed`)."""
        return BatchStream(self, seed)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        examples = [self.examples[i] for i in indices]
        return self._collate(examples) if self._collate else collate(examples, self.pad_token_id)


class BatchStream:
    """One peer's walk through its data order: ``next()`` gives a batch of the spec's per-peer size,
    ``take(n)`` a smaller one. A smaller batch only takes fewer rows off the order: the rest come next,
    so the order (and which rows an epoch covers) is the same whatever sizes are asked for."""

    def __init__(self, data: PeerDataStream, seed: int):
        self._data = data
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self.batch_size = data.batch_size

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.take(self.batch_size)

    def take(self, size: int) -> dict[str, torch.Tensor]:
        size = max(1, min(size, self.batch_size))
        while len(self._order) < size:
            fresh = list(range(len(self._data.examples)))
            self._rng.shuffle(fresh)
            self._order.extend(fresh)
        chosen, self._order = self._order[:size], self._order[size:]
        return self._data.collate(chosen)
