"""Expert shards without a server process: the ``--experts`` syntax, one expert loaded from the checkpoint computes
what the model's own experts do, the fault rule's gates, the record schema and the trainer's model without
experts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck.peer.shard.blocks import ShardLoadError
from potluck.peer.shard.client.remote_experts import renormalised
from potluck.peer.shard.experts import load_experts, load_without_experts, moe_config, parse_experts
from potluck.protocols.experts import ExpertAnnouncement

pytestmark = pytest.mark.unit


def test_experts_syntax_names_every_layer_or_one(family_model):
    config, _ = moe_config(family_model("mixtral"))  # 2 layers, 4 experts each
    assert parse_experts("0-1", config) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert parse_experts("1:3,0:0-1", config) == [(0, 0), (0, 1), (1, 3)]
    with pytest.raises(ValueError, match=r"--experts: expert '4' is not within 0-3"):
        parse_experts("4", config)
    with pytest.raises(ValueError, match=r"--experts: layer '2' is not within 0-1"):
        parse_experts("2:0", config)
    with pytest.raises(ValueError, match=r"--experts: 'x': expected E, A-B"):
        parse_experts("x", config)


def test_a_dense_model_has_no_experts_to_serve(tiny_assets):
    with pytest.raises(ShardLoadError, match=r"model.name_or_path: model type 'llama' has no experts"):
        moe_config(tiny_assets["model"])


def test_a_loaded_expert_computes_what_the_models_expert_does(family_model):
    model_dir = family_model("mixtral")
    local = AutoModelForCausalLM.from_pretrained(model_dir)
    (expert,) = load_experts(model_dir, [(1, 2)]).values()
    hidden = torch.randn(5, local.config.hidden_size)
    ones = torch.ones(5, 1)
    with torch.no_grad():
        expected = local.model.layers[1].mlp.experts(hidden, torch.full((5, 1), 2), ones)
        torch.testing.assert_close(expert(hidden), expected, atol=1e-6, rtol=1e-5)


def test_the_trainers_model_holds_no_expert_and_loads_the_rest(family_model):
    model_dir = family_model("mixtral")
    model = load_without_experts(model_dir, lambda layer: torch.nn.Identity())
    local = AutoModelForCausalLM.from_pretrained(model_dir)
    names = dict(model.named_parameters())
    assert not any(".experts." in name for name in names)
    for name, parameter in local.named_parameters():
        if ".experts." not in name:
            assert torch.equal(names[name], parameter), name


def test_gates_of_answered_experts_are_renormalised_and_others_kept():
    gates = torch.tensor([[0.75, 0.25], [0.6, 0.4], [0.5, 0.5]])
    answered = torch.tensor([[True, True], [False, True], [False, False]])
    expected = torch.tensor([[0.75, 0.25], [0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(renormalised(gates, answered), expected)


def test_an_expert_record_is_strict():
    fields = {"run_id": "r", "peer_id": "p", "throughput": 1.0, "state": "online", "version": "v",
              "announced_at": 1.0}  # fmt: skip
    assert ExpertAnnouncement(uids=["0.1", "12.3"], **fields).uids == ["0.1", "12.3"]
    for uids in (["0.1", "0.1"], ["expert.1"], []):
        with pytest.raises(ValueError, match="uids"):
            ExpertAnnouncement(uids=uids, **fields)
