"""Expert shards without a server process: the ``--experts`` syntax, one expert loaded from the checkpoint computes
what the model's own experts do, the fault rule's gates, the record schema, the trainer's model without
experts, a server's optimizer step and checkpoint, and how replicas average an expert."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from potluck.peer.shard import wire
from potluck.peer.shard.blocks import ShardLoadError
from potluck.peer.shard.client.expert_calls import BUSY_LOAD, ExpertDirectory
from potluck.peer.shard.client.remote_experts import renormalised
from potluck.peer.shard.experts import load_experts, load_without_experts, moe_config, parse_experts
from potluck.peer.shard.server.expert_checkpoint import resume_experts, save_experts
from potluck.peer.shard.server.expert_replicas import Refused, checked_count, checked_state, mean_in_order
from potluck.peer.shard.server.expert_service import ExpertServicer, ServedExperts
from potluck.peer.shard.server.service import ServerLimits
from potluck.protocols.experts import ExpertAnnouncement
from potluck.protocols.runspec import parse_run_spec

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


RECORD = {
    "run_id": "r",
    "peer_id": "p",
    "throughput": 1.0,
    "state": "online",
    "version": "v",
    "announced_at": 1.0,
}


def test_an_expert_record_is_strict():
    assert ExpertAnnouncement(uids=["0.1", "12.3"], **RECORD).uids == ["0.1", "12.3"]
    for uids in (["0.1", "0.1"], ["expert.1"], []):
        with pytest.raises(ValueError, match="uids"):
            ExpertAnnouncement(uids=uids, **RECORD)
    assert ExpertAnnouncement(uids=["0.1"], **RECORD).load == 0.0
    for load in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="load"):
            ExpertAnnouncement(uids=["0.1"], load=load, **RECORD)


def _directory(**servers: tuple[float, float]) -> ExpertDirectory:
    """A trainer's directory of servers of expert 0.1, each ``name=(throughput, load)`` (no DHT read)."""
    directory = ExpertDirectory(dht=None, run_id="r")
    directory.servers = {
        name: ExpertAnnouncement(uids=["0.1"], **{**RECORD, "peer_id": name, "throughput": t, "load": load})
        for name, (t, load) in servers.items()
    }
    return directory


def test_an_expert_stays_on_its_last_server_until_that_server_is_busy_then_goes_where_most_throughput_is_spare():
    directory = _directory(a=(1000.0, 0.5), b=(900.0, 0.0), c=(2000.0, 0.7))
    assert directory.candidates("0.1") == ["b", "c", "a"]  # spare: 900, 600, 500
    directory.last_good["0.1"] = "a"
    assert directory.candidates("0.1") == ["a", "b", "c"]  # it answered last and is not busy
    directory.servers["a"] = directory.servers["a"].copy(update={"load": BUSY_LOAD})
    assert directory.candidates("0.1") == ["b", "c", "a"]
    directory.ban("b")
    assert directory.candidates("0.1") == ["c", "a"]


def test_an_expert_server_times_and_counts_each_experts_requests_and_reports_its_load(family_model):
    servicer = ExpertServicer(_served(family_model("mixtral")), "moe-run", 128, ServerLimits())
    try:

        async def ask(method: str, tensors: list[torch.Tensor], uid: str):
            handler = servicer.rpc_forward if method == "forward" else servicer.rpc_backward
            return await handler(wire.request(tensors, uid=uid), None)

        async def requests():
            hidden = torch.randn(3, 128)
            answered = await ask("forward", [hidden], "0.1")
            torch.testing.assert_close(
                wire.unpack_response(answered)[0], servicer.served.forward((0, 1), hidden)
            )
            await ask("backward", [hidden, torch.randn(3, 128)], "0.1")
            refused = await ask("forward", [torch.randn(3, 64)], "1.2")  # the wrong hidden size
            with pytest.raises(wire.RemoteError, match="expected"):
                wire.unpack_response(refused)
            await ask("forward", [hidden], "0.3")  # not served: refused before any expert is named
            steps = servicer.served.state((1, 2))[1]
            wire.unpack_response(await servicer.rpc_idle_steps(wire.request([], uids=["1.2"]), None))
            assert servicer.served.state((1, 2))[1] == steps + 1  # a step on a zero gradient
            assert servicer.served.state((0, 1))[1] == 1  # only the expert named
            for uids in (["1.2", "1.2"], ["0.3"], "1.2", []):
                with pytest.raises(wire.RemoteError, match="uid"):
                    wire.unpack_response(await servicer.rpc_idle_steps(wire.request([], uids=uids), None))
            assert servicer.served.state((1, 2))[1] == steps + 1

        asyncio.run(requests())
        registry = servicer.metrics.registry

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"run_id": "moe-run", **labels})

        assert value("potluck_expert_tokens_total", expert="0.1") == 3
        for method in ("forward", "backward"):
            assert value("potluck_expert_request_seconds_count", expert="0.1", method=method) == 1
            assert value("potluck_expert_request_seconds_sum", expert="0.1", method=method) > 0
        failures = "potluck_expert_request_failures_total"
        assert value(failures, expert="1.2", kind="bad_request") == 1
        assert value(failures, expert="0.1", kind="bad_request") == 0  # every served expert has its series
        assert value("potluck_expert_request_seconds_count", expert="0.3", method="forward") is None
        assert servicer.executor.busy_seconds > 0
        load = servicer.load()
        assert 0.0 < load <= 1.0 and value("potluck_expert_server_load") == load
    finally:
        servicer.shutdown()


def _served(model_dir):
    spec = parse_run_spec({"run_id": "moe-run", "model": {"name_or_path": str(model_dir)}, "data": {"path": "x"},
                           "optimizer": {"lr": 0.01}, "batch": {"target_batch_size": 1, "per_peer_batch_size": 1}})  # fmt: skip
    return ServedExperts(load_experts(model_dir, [(0, 1), (1, 2)]), spec)


def test_a_backward_request_steps_its_expert_and_a_checkpoint_resumes_it(family_model, tmp_path):
    model_dir = family_model("mixtral")
    served = _served(model_dir)
    hidden, grad = torch.randn(3, 128), torch.randn(3, 128)
    before, _ = served.state((0, 1))
    served.backward((0, 1), hidden, grad)
    after, steps = served.state((0, 1))
    assert steps == 1 and served.state((1, 2))[1] == 0  # only the expert asked stepped
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    save_experts(tmp_path, "moe-run", served, keep=1)

    resumed = _served(model_dir)
    assert resume_experts(tmp_path, "moe-run", resumed) is not None
    assert resumed.state((0, 1))[1] == 1
    for saved, loaded in zip(after, resumed.state((0, 1))[0], strict=True):
        assert torch.equal(saved, loaded)
    # the same next step from the saved AdamW statistics as from the live ones
    served.backward((0, 1), hidden, grad)
    resumed.backward((0, 1), hidden, grad)
    for live, again in zip(served.state((0, 1))[0], resumed.state((0, 1))[0], strict=True):
        torch.testing.assert_close(live, again, atol=0, rtol=0)


def test_replicas_that_average_the_same_parts_hold_the_same_expert_to_the_bit(family_model):
    model_dir = family_model("mixtral")
    a, c = _served(model_dir), _served(model_dir)
    uid = (0, 1)
    a.backward(uid, torch.randn(3, 128), torch.randn(3, 128))  # a trained, c did not: they differ
    sent = {"peer-a": a.state(uid), "peer-c": c.state(uid)}
    # as weights, the steps each took since they last averaged: only a's step counts, and c takes a's expert
    parts = {peer: (tensors, steps) for peer, (tensors, steps) in sent.items()}
    assert [steps for _, steps in parts.values()] == [1, 0]
    for served, peer in ((a, "peer-a"), (c, "peer-c")):
        mean = mean_in_order(
            dict(reversed(parts.items())) if peer == "peer-c" else parts
        )  # the order received
        with served.steps[uid].lock:
            served.steps[uid].move_to(mean, *sent[peer])
    for x, y in zip(a.state(uid)[0], c.state(uid)[0], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a.state(uid)[0], sent["peer-a"][0], strict=True):
        assert torch.equal(x, y)  # a did not move back towards c's untrained copy
    # equal weights (both trained as much, or neither): each counts one
    one, two = [torch.ones(2)], [torch.full((2,), 3.0)]
    for weights in ((2, 2), (0, 0)):
        assert torch.equal(
            mean_in_order({"a": (one, weights[0]), "c": (two, weights[1])})[0], torch.full((2,), 2.0)
        )

    # a step taken during the round is kept on top of the average
    tensors, steps = c.state(uid)
    c.backward(uid, torch.randn(3, 128), torch.randn(3, 128))
    stepped = c.state(uid)[0]
    with c.steps[uid].lock:
        c.steps[uid].move_to(tensors, tensors, steps)  # a round whose average is what c sent
    for x, y in zip(c.state(uid)[0], stepped, strict=True):
        assert torch.equal(x, y)


def test_a_replicas_state_that_is_malformed_or_not_finite_is_refused(family_model):
    served = _served(family_model("mixtral"))
    steps = served.steps[(0, 1)]
    tensors, count = served.state((0, 1))
    assert checked_state(tensors, torch.tensor(count), steps, "x")[1] == count
    poisoned = [t.clone() for t in tensors]
    poisoned[1][0, 0] = float("nan")
    with pytest.raises(Refused, match="the state from c holds NaN or Inf"):
        checked_state(poisoned, torch.tensor(count), steps, "the state from c")
    with pytest.raises(Refused, match="other shapes"):
        checked_state(tensors[:3], torch.tensor(count), steps, "the state from c")
    with pytest.raises(Refused, match="no step count"):
        checked_state(tensors, torch.tensor(-1), steps, "the state from c")
    with pytest.raises(Refused, match="no weight"):  # a round's weight: at most the steps it counts from
        checked_count(torch.tensor(count + 1), "the state from c has no weight", count)
    assert checked_count(torch.tensor(count), "the state from c has no weight", count) == count


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"adapter": {"kind": "lora"}}, "adapter.kind: a mixture-of-experts run trains its experts on the expert servers "
                                      "and the rest on the client, in full: set none, not 'lora'"),
     ({"stage": "dpo"}, "stage: --role client trains a mixture of experts in sft, got 'dpo'")],
)  # fmt: skip
def test_run_peer_client_role_refuses_what_it_cannot_train_of_a_mixture_in_one_line(
    family_model, tiny_assets, tmp_path, capsys, overrides, message
):
    import yaml

    from potluck.peer.cli import main

    spec = {"run_id": "moe-run", "model": {"name_or_path": str(family_model("mixtral"))},
            "data": {"path": str(tiny_assets["train"])}, "batch": {"target_batch_size": 4, "per_peer_batch_size": 4},
            **overrides}  # fmt: skip
    if overrides.get("stage") == "dpo":
        spec["data"]["path"] = str(tiny_assets["train"].parent / "preferences_train.jsonl")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    capsys.readouterr()  # building the model printed its progress
    assert main(["--role", "client", "--run-spec", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"run-peer: {message}"
