"""Checkpoints are written atomically, pruned to the newest N, and found again by run id."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from potluck.peer.training.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint

pytestmark = pytest.mark.unit


class _Weights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def save_pretrained(self, path):
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path / "weights.pt")


def test_keep_last_and_latest(tmp_path, tiny_assets):
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, "run-a", step, _Weights(), tokenizer, {"step": step}, keep=2)
    save_checkpoint(tmp_path, "run-b", 9, _Weights(), tokenizer, {}, keep=2)
    assert [c.global_step for c in list_checkpoints(tmp_path, "run-a")] == [2, 3]
    latest = latest_checkpoint(tmp_path, "run-a")
    assert latest.global_step == 3
    assert torch.load(latest.strategy_state_path) == {"step": 3}
    assert latest_checkpoint(tmp_path, "run-b").global_step == 9
    assert latest_checkpoint(tmp_path, "run-c") is None


def test_interrupted_and_corrupt_checkpoints_are_ignored(tmp_path):
    (tmp_path / "checkpoint-0000005").mkdir()  # a write that never finished: no trainer_state.json
    broken = tmp_path / "checkpoint-0000006"
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{not json")
    assert list_checkpoints(tmp_path) == []
