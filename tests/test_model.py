"""The run's model loads through from_pretrained and every adapter kind trains only its own tensors."""

from __future__ import annotations

import pytest
import torch

from potluck.peer.training.model import build_model, load_tokenizer, trainable_parameters
from potluck.protocols.runspec import parse_run_spec

pytestmark = pytest.mark.unit

ADAPTERS = [
    {"kind": "none"},
    {"kind": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    {"kind": "prefix", "num_virtual_tokens": 4},
    {"kind": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 32},
    {"kind": "prompt_tuning", "num_virtual_tokens": 4},
]


def spec_for(tiny_assets, adapter):
    return parse_run_spec(
        {
            "run_id": "t",
            "model": {"name_or_path": str(tiny_assets["model"])},
            "adapter": adapter,
            "data": {"path": str(tiny_assets["train"])},
            "batch": {"target_batch_size": 4, "per_peer_batch_size": 4},
        }
    )


@pytest.mark.parametrize("adapter", ADAPTERS, ids=[a["kind"] for a in ADAPTERS])
def test_adapter_trains_only_its_parameters(tiny_assets, adapter):
    spec = spec_for(tiny_assets, adapter)
    tokenizer = load_tokenizer(spec.model)
    model = build_model(spec, torch.device("cpu"))
    trainable = trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    if adapter["kind"] == "none":
        assert n_trainable == total
    else:
        assert 0 < n_trainable < total / 2

    ids = tokenizer(["1+2=3", "4+5=9"], return_tensors="pt", add_special_tokens=False).input_ids
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize("adapter", ADAPTERS[1:3], ids=["lora", "prefix"])
def test_adapter_init_is_identical_on_every_peer(tiny_assets, adapter):
    spec = spec_for(tiny_assets, adapter)
    first = [p.detach().clone() for p in trainable_parameters(build_model(spec, torch.device("cpu")))]
    torch.manual_seed(1234)  # whatever a peer did before must not matter
    second = trainable_parameters(build_model(spec, torch.device("cpu")))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=False))


def test_checkpointed_adapter_round_trips(tiny_assets, tmp_path):
    spec = spec_for(tiny_assets, ADAPTERS[1])
    model = build_model(spec, torch.device("cpu"))
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.5)
    model.save_pretrained(tmp_path)
    restored = build_model(spec, torch.device("cpu"), weights_from=str(tmp_path))
    assert all(
        torch.equal(a, b)
        for a, b in zip(trainable_parameters(model), trainable_parameters(restored), strict=False)
    )
    assert trainable_parameters(restored)[0].requires_grad
