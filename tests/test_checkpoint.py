"""Checkpoints are written atomically, pruned to the newest N, and found again by run id."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from potluck.peer.shard.client.client_checkpoint import (
    ClientCheckpointMismatch,
    load_client_weights,
    load_strategy_state,
    save_client,
)
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


class _Strategy:
    """An averaging strategy's checkpoint surface: its state, a global step."""

    def __init__(self, global_step: int = 0):
        self.global_step = global_step

    def state_dict(self) -> dict:
        return {"global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["global_step"]


def _client_model(width: int = 4) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 2))
    model[1].requires_grad_(False)  # a frozen part (a MoE client's experts live on servers: not its own)
    return model


def test_a_shard_client_resumes_what_it_trains_and_its_strategy_from_its_own_checkpoint(tmp_path):
    model = _client_model()
    saved = save_client(tmp_path, "r", 7, model, _Strategy(7), keep=2)
    assert (
        saved.path.name == "client-checkpoint-0000007" and latest_checkpoint(tmp_path, "r") is None
    )  # not a trainer's
    trained = model[0].weight.detach().clone()

    fresh, strategy = _client_model(), _Strategy()
    found = load_client_weights(tmp_path, "r", fresh)
    load_strategy_state(found, strategy)
    assert found.global_step == 7 and torch.equal(fresh[0].weight, trained) and strategy.global_step == 7
    assert not torch.equal(fresh[1].weight, model[1].weight)  # frozen parts are not the checkpoint's business
    assert load_client_weights(tmp_path, "another-run", _client_model()) is None


def test_a_client_checkpoint_of_other_parameters_is_refused_naming_it_and_a_lora_client_keeps_its_step_count(
    tmp_path,
):
    save_client(tmp_path, "r", 3, _client_model(), _Strategy(3), keep=1)
    other = _client_model(width=8)
    before = other[0].weight.detach().clone()
    with pytest.raises(ClientCheckpointMismatch, match="client-checkpoint-0000003: its parameters are not"):
        load_client_weights(tmp_path, "r", other)
    assert torch.equal(other[0].weight, before)  # nothing loaded
    frozen = _client_model().requires_grad_(
        False
    )  # a lora client: the servers train and checkpoint the adapter
    save_client(tmp_path / "lora", "r", 5, frozen, _Strategy(5), keep=1)
    strategy = _Strategy()
    load_strategy_state(
        load_client_weights(tmp_path / "lora", "r", _client_model().requires_grad_(False)), strategy
    )
    assert strategy.global_step == 5
