"""Everything the demo and the tests train on, built on this machine: the tiny model and the task data."""

from __future__ import annotations

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
