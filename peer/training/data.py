"""Datasets in TRL's formats, tokenised for causal-LM training, and each peer's own stream of them.

Formats (picked by ``data.format`` or, with ``auto``, by the columns of the first row):
``prompt_completion`` (loss on the completion only), ``messages`` (chat; loss on the last assistant
turn), ``text`` (loss on every token).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from potluck.protocols.runspec import DataSpec

IGNORE_INDEX = -100
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


def split_prompt_completion(row: dict[str, Any], fmt: str, tokenizer) -> tuple[str, str]:
    """Return (prompt text, completion text) for any format; ``text`` rows have an empty prompt."""
    if fmt == "prompt_completion":
        return row["prompt"], row["completion"]
    if fmt == "messages":
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, messages[-1]["content"]
    return "", row["text"]


def tokenize_example(row: dict[str, Any], fmt: str, tokenizer, max_length: int) -> TokenizedExample:
    prompt, completion = split_prompt_completion(row, fmt, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    input_ids = (bos + prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + completion_ids)[:max_length]
    return TokenizedExample(input_ids, labels)


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
            self.examples = [stage_data.encode(r) for r in rows]
            self._collate = stage_data.collate
        else:
            self.format = detect_format(rows[0], spec.format)
            self.examples = [tokenize_example(r, self.format, tokenizer, spec.max_length) for r in rows]
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
