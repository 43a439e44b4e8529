"""Expert shards of a mixture-of-experts LM as real processes on loopback: three ``run-peer --role experts``
servers over the tiny Mixtral (2 MoE layers × 4 experts, top-2), and a trainer in this process whose attention,
embeddings, norms and routers are local.

Placement: ``a`` serves experts 0-1 of both layers, ``b`` 2-3, ``c`` expert 1 again (a replica). Tests that train
come after those that compare with the local model (training moves the servers' weights away from the
checkpoint's); the last one kills ``a``: its expert 1 is re-routed to ``c``, its expert 0 dropped by the fault
rule, and training goes on.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from potluck.protocols.experts import read_experts
from potluck.protocols.runspec import load_run_spec
from potluck.tools.expert_swarm import moe_trainer
from tests.conftest import serving_experts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
PLACEMENT = {"a": "0-1", "b": "2-3", "c": "1"}
ALL_UIDS = [f"{layer}.{expert}" for layer in range(2) for expert in range(4)]
PROBLEMS = ["1+2=3", "4+5=9", "3+3=6", "7+1=8"]


@pytest.fixture(scope="module")
def moe_spec(write_moe_spec):
    return write_moe_spec(
        "moe-run", optimizer={"lr": 0.01}, batch={"target_batch_size": 4, "per_peer_batch_size": 4}
    )


@pytest.fixture(scope="module")
def servers(moe_spec):
    with serving_experts(moe_spec, PLACEMENT) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def remote(servers, moe_spec):
    with moe_trainer(load_run_spec(moe_spec), servers.peers, request_timeout=10.0) as trainer:
        yield trainer


@pytest.fixture(scope="module")
def batch(family_model):
    tokenizer = AutoTokenizer.from_pretrained(family_model("mixtral"))
    ids = torch.tensor([tokenizer(p)["input_ids"] for p in PROBLEMS])
    return ids


def test_experts_are_announced_with_their_servers(servers, remote):
    _, client = remote
    announced = {
        a.peer_id: set(a.uids) for a in read_experts(client.directory.dht, "moe-run").records.values()
    }
    by_name = {peer.name: announced[peer.peer_id()] for peer in servers.peers}
    assert by_name == {
        "a": {"0.0", "0.1", "1.0", "1.1"},
        "b": {"0.2", "0.3", "1.2", "1.3"},
        "c": {"0.1", "1.1"},
    }


def test_remote_forward_and_loss_equal_the_local_model(remote, batch, family_model):
    model, client = remote
    local = AutoModelForCausalLM.from_pretrained(family_model("mixtral"))
    with torch.no_grad():
        expected = local(batch, labels=batch)
        got = model(batch, labels=batch)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)  # the router's loss included
    assert client.metrics.dropped == 0 and client.metrics.failures == 0
    assert set(client.metrics.tokens_by_expert) <= set(ALL_UIDS) and client.metrics.tokens_by_expert


def test_remote_greedy_generation_equals_the_local_model(remote, batch, family_model):
    model, _ = remote
    local = AutoModelForCausalLM.from_pretrained(family_model("mixtral"))
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": local.config.eos_token_id}
    with torch.no_grad():
        expected = local.generate(batch, **settings)
        got = model.generate(batch, **settings)
    assert got.tolist() == expected.tolist()


def test_a_training_step_trains_the_local_router_and_attention_and_the_servers_experts(
    servers, remote, batch
):
    model, client = remote
    model.train()
    peer_of = {peer.name: peer.peer_id() for peer in servers.peers}
    before = {uid: client.expert_state(peer_of["b"], uid) for uid in ("0.2", "1.3")}
    router, attention = model.model.layers[0].mlp.gate.weight, model.model.layers[1].self_attn.q_proj.weight
    local_before = router.detach().clone(), attention.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)

    loss = model(batch, labels=batch).loss
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    assert not torch.equal(router, local_before[0]) and not torch.equal(attention, local_before[1])
    for uid, (weights, steps) in before.items():
        after, steps_after = client.expert_state(peer_of["b"], uid)
        assert steps_after == steps + 1, uid  # one optimizer step per backward request
        assert all(not torch.equal(w, v) for w, v in zip(weights, after, strict=True)), uid
    assert client.metrics.backward_dropped == 0


def test_training_goes_on_when_an_expert_server_is_killed(servers, remote, batch):
    model, client = remote
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    a = next(peer for peer in servers.peers if peer.name == "a")
    for uid in ("0.1", "1.1"):  # a serves them when it dies (else the throughput a server measured picks)
        client.directory.last_good[uid] = a.peer_id()
    losses = []
    for step in range(6):
        loss = model(batch, labels=batch).loss
        if step == 2:  # between forward and backward: the step in flight loses a's backward
            os.killpg(a.process.pid, signal.SIGKILL)
            a.process.wait(timeout=30)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    metrics = client.metrics
    # expert 1 of each layer has a replica on c: re-routed; expert 0 has none: dropped, gates renormalised
    assert metrics.rerouted >= 1, metrics
    assert metrics.dropped >= 1 and metrics.dropped_tokens >= 1, metrics
    assert metrics.backward_dropped >= 1, metrics  # expert 0's backward in the step in flight
    assert a.peer_id() not in {p for uid in ALL_UIDS for p in client.directory.candidates(uid)}  # banned
    assert {"1.0", "0.0"} & set(metrics.failures_by_expert), metrics
