"""Everything the demo and the tests train on, built on this machine: the tiny model and the task data."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from potluck.tools.tiny.model import TinyModelConfig, build_tiny_model
from potluck.tools.tiny.preferences import write_rlhf_data
from potluck.tools.tiny.task import ALPHABET, ArithmeticTask


def build_assets(out: Path, task: ArithmeticTask | None = None) -> tuple[Path, Path, Path]:
    """Build the tiny model (``out/tiny-model``) and the task data (``out/data``: SFT's prompt/completion files,
    and the RLHF stages' preference pairs and prompts, ``tools/tiny/preferences.py``)."""
    task = task or ArithmeticTask()
    model_dir = build_tiny_model(out / "tiny-model", task.corpus(), ALPHABET, TinyModelConfig())
    train, held_out = task.write(out / "data")
    write_rlhf_data(task, out / "data")
    return model_dir, train, held_out


CONVERSATION_COLUMNS = ("completion", "chosen", "rejected")
"""The columns that become an assistant turn in :func:`as_conversation` (the prompt becomes the user's)."""


def as_conversation(row: dict) -> dict:
    """A task row in TRL's conversational format: the prompt as one user turn, a completion (or each side of a
    preference pair) as one assistant turn; other columns (a GRPO row's ``answer``) as they are."""
    turns = {"prompt": [{"role": "user", "content": row["prompt"]}]}
    turns |= {c: [{"role": "assistant", "content": row[c]}] for c in CONVERSATION_COLUMNS if c in row}
    return {**row, **turns}


def write_conversations(data_dir: Path, out_dir: Path, limit: int | None = None) -> dict[str, Path]:
    """Every JSONL file of ``data_dir`` (the task's, ``build_assets``) in TRL's conversational format
    (:func:`as_conversation`), its first ``limit`` rows, under the same name in ``out_dir``: what a model of another
    family (``tools/tiny/families.py``) trains on through its own chat template."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for source in sorted(data_dir.glob("*.jsonl")):
        with source.open() as f:
            rows = [as_conversation(json.loads(line)) for line in islice(f, limit)]
        target = out_dir / source.name
        target.write_text("".join(json.dumps(row) + "\n" for row in rows))
        written[source.stem] = target
    return written
