"""Checkpoints of a shard server's span adapter in ``--save-dir``, beside (never mistaken for) a trainer's.

``span-checkpoint-<span step>/`` folders, written atomically by the trainers' writer
(``runtime/checkpoints.write_checkpoint``) and kept ``checkpoint.keep`` at a time: ``adapter.pt`` holds the
LoRA tensors' names and the adapter's state (its tensors and AdamW statistics, ``SpanAdapter.snapshot``), and
``trainer_state.json`` the run id, the span step and the span's blocks. A server saves every
``checkpoint.save_every`` span steps and when it leaves cleanly, and resumes from its newest checkpoint of the
run at start; without ``--blocks`` it serves the checkpoint's span again. A checkpoint of another span, or of
another adapter (``adapter.r``, ``target_modules``), is refused with one line; another run's is ignored, as a
trainer ignores it (one ``--save-dir`` may hold several runs).
"""

from __future__ import annotations

from pathlib import Path

import torch

from potluck.peer.shard.server.adapters import SpanAdapter
from potluck.peer.shard.server.steps import StateMismatch
from potluck.runtime.checkpoints import Checkpoint, latest_checkpoint, write_checkpoint

PREFIX = "span-checkpoint-"
ADAPTER_FILE = "adapter.pt"


class SpanCheckpointError(ValueError):
    """A span checkpoint this server cannot resume from; ``str()`` is one line for the user."""


def save_span_adapter(
    save_dir: Path, run_id: str, blocks: tuple[int, int], adapter: SpanAdapter, keep: int
) -> Checkpoint:
    """Write the adapter's state (call with ``adapter.lock`` held)."""
    tensors, steps = adapter.snapshot()

    def write(folder: Path) -> None:
        torch.save({"names": adapter.names, "tensors": tensors, "steps": steps}, folder / ADAPTER_FILE)

    return write_checkpoint(save_dir, run_id, steps, write, keep, PREFIX, span=list(blocks))


def checkpointed_blocks(save_dir: Path, run_id: str) -> tuple[int, int] | None:
    """The span of the run's newest span checkpoint in ``save_dir``, if any."""
    found = latest_checkpoint(save_dir, run_id, PREFIX)
    return None if found is None else _blocks_of(found)


def resume_span_adapter(
    save_dir: Path, run_id: str, blocks: tuple[int, int], adapter: SpanAdapter
) -> Checkpoint | None:
    """Load the run's newest span checkpoint in ``save_dir`` into ``adapter``; None if there is none. Raises
    :class:`SpanCheckpointError` for a checkpoint of other blocks or of another adapter."""
    found = latest_checkpoint(save_dir, run_id, PREFIX)
    if found is None:
        return None
    saved_blocks = _blocks_of(found)
    if saved_blocks != tuple(blocks):
        raise SpanCheckpointError(
            f"--save-dir {save_dir}: {found.path.name} holds the adapter of blocks {saved_blocks[0]}:{saved_blocks[1]}, "
            f"not of the blocks {blocks[0]}:{blocks[1]} this server serves (use another --save-dir, or --blocks "
            f"{saved_blocks[0]}:{saved_blocks[1]})"
        )
    try:
        state = torch.load(found.path / ADAPTER_FILE, weights_only=True)
        names, tensors, steps = state["names"], state["tensors"], int(state["steps"])
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise SpanCheckpointError(f"--save-dir {save_dir}: {found.path.name} is unreadable ({e})") from None
    if names != adapter.names:
        raise SpanCheckpointError(
            f"--save-dir {save_dir}: {found.path.name} holds {len(names)} LoRA tensors of other modules than "
            f"this run's {len(adapter.names)} (adapter.target_modules changed?)"
        )
    with adapter.lock:
        try:
            adapter.adopt(tensors, steps, f"--save-dir {save_dir}: {found.path.name}")
        except StateMismatch as e:
            raise SpanCheckpointError(str(e)) from None
    return found


def _blocks_of(checkpoint: Checkpoint) -> tuple[int, int]:
    span = checkpoint.state.get("span")
    if not (isinstance(span, list) and len(span) == 2 and all(isinstance(b, int) for b in span)):
        raise SpanCheckpointError(f"{checkpoint.path}: names no span of blocks (not a span checkpoint?)")
    return span[0], span[1]
