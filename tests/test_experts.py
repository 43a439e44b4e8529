"""Expert shards of a mixture-of-experts LM as real processes on loopback: three ``run-peer --role experts``
servers over the tiny Mixtral (2 MoE layers × 4 experts, top-2), and a trainer in this process whose attention,
embeddings, norms and routers are local.

Placement: ``a`` serves experts 0-1 of both layers, ``b`` 2-3, ``c`` expert 1 again (a replica, averaged with
``a``'s every 2 s of DHT time). Tests that train come after those that compare with the local model (training moves
the servers' weights away from the checkpoint's); then one kills ``a``: its expert 1 is re-routed to ``c``, its
expert 0 dropped by the fault rule, and training goes on; the last restarts ``a``, which takes expert 1's state
from ``c`` and serves again.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from potluck.peer.shard.client.generate import generate_text
from potluck.peer.shard.experts import load_experts
from potluck.protocols.experts import parse_uid, read_experts
from potluck.protocols.runspec import load_run_spec
from potluck.tools.coordinator_process import free_port
from potluck.tools.expert_swarm import moe_trainer
from tests.conftest import serving_experts
from tests.helpers import wait_until
from tests.test_ops_prometheus import every_dashboard_query_returns_data, query, running_prometheus

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
PLACEMENT = {"a": "0-1", "b": "2-3", "c": "1"}
ALL_UIDS = [f"{layer}.{expert}" for layer in range(2) for expert in range(4)]
PROBLEMS = ["1+2=3", "4+5=9", "3+3=6", "7+1=8"]


@pytest.fixture(scope="module")
def moe_spec(write_moe_spec):
    return write_moe_spec(
        "moe-run",
        optimizer={"lr": 0.01},
        batch={"target_batch_size": 4, "per_peer_batch_size": 4},
        expert_replicas={"average_every": 2},
    )


@pytest.fixture(scope="module")
def metrics_ports() -> dict[str, int]:
    return {name: free_port() for name in PLACEMENT}


@pytest.fixture(scope="module")
def servers(moe_spec, metrics_ports):
    with serving_experts(moe_spec, PLACEMENT, metrics_ports=metrics_ports) as swarm:
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


def test_potluck_generate_remote_through_experts_equals_local(servers, moe_spec):
    spec = load_run_spec(moe_spec)
    addresses = [peer.join_address() for peer in servers.peers]
    local = generate_text(spec, "4+5=", 6)
    remote = generate_text(spec, "4+5=", 6, initial_peers=addresses)
    assert remote.text == local.text and remote.prompt == local.prompt
    assert remote.counters["tokens_by_expert"] and remote.counters["dropped"] == 0


def test_a_capacity_factor_caps_the_tokens_each_expert_takes(remote, batch):
    model, client = remote
    layers = [layer.mlp.experts for layer in model.model.layers]
    tokens, overflow = dict(client.metrics.tokens_by_expert), client.metrics.overflow_tokens
    pairs = batch.numel() * model.config.num_experts_per_tok  # per layer
    for experts in layers:
        experts.capacity_factor = 0.5
    try:
        with torch.no_grad():
            loss = model(batch, labels=batch).loss
        limit = layers[0].capacity(pairs)
    finally:
        for experts in layers:
            experts.capacity_factor = None
    sent = {uid: n - tokens.get(uid, 0) for uid, n in client.metrics.tokens_by_expert.items()}
    assert limit == pairs // 8 and max(sent.values()) <= limit, sent  # half of an even share of 4 experts
    assert sum(sent.values()) < 2 * pairs  # some pairs overflowed, and every one is counted
    assert client.metrics.overflow_tokens - overflow == 2 * pairs - sum(sent.values())
    assert torch.isfinite(loss) and client.metrics.dropped == 0


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


def test_run_peer_client_role_trains_a_mixture_of_experts_through_its_servers(servers, remote, moe_spec):
    _, client = remote
    b = next(peer for peer in servers.peers if peer.name == "b")
    b_experts = ("0.2", "0.3", "1.2", "1.3")
    steps_before = sum(client.expert_state(b.peer_id(), uid)[1] for uid in b_experts)
    save_dir = moe_spec.parent / "moe-client"

    def train_client(name: str, steps: int):
        trainer = servers.start_peer(
            name,
            ["--role", "client", "--run-spec", str(moe_spec), "--max-steps", str(steps), "--save-dir", str(save_dir)],
            initial_peers=[b.join_address()],
        )  # fmt: skip
        assert trainer.process.wait(timeout=180) == 0, trainer.log()[-3000:]
        return trainer

    trainer = train_client("moe-client", 3)
    summary = trainer.summary()
    assert (summary.role, summary.global_step, summary.exit_reason) == ("client", 3, "max_steps"), summary
    assert summary.last_loss is not None and summary.last_loss >= 0, summary
    (found,) = trainer.events("expert_servers")
    assert sorted(found["peer_ids"]) == sorted(p.peer_id() for p in servers.peers if p.name in PLACEMENT)
    # the servers trained their experts from its gradients (b's took tokens in 3 steps)
    steps_after = sum(client.expert_state(b.peer_id(), uid)[1] for uid in b_experts)
    assert steps_after > steps_before
    # it checkpointed what it trains (attention, routers...) and a restart resumes from it
    assert trainer.events("checkpoint")[-1]["global_step"] == 3
    again = train_client("moe-client-again", 4)
    (resumed,) = again.events("resumed")
    assert resumed["global_step"] == 3 and again.summary().global_step == 4, again.summary()
    # and trains on from the checkpoint's weights: step 4 is one update from step 3's, not from the base model's
    saved = {e["global_step"]: torch.load(Path(e["path"]) / "client.pt") for e in again.events("checkpoint")}
    saved[3] = torch.load(Path(trainer.events("checkpoint")[-1]["path"]) / "client.pt")
    base = load_file(Path(load_run_spec(moe_spec).model.name_or_path) / "model.safetensors")
    names = [name for name in saved[4] if name in base]
    assert names, sorted(saved[4])[:5]

    def distance(a: dict, b: dict) -> float:
        return sum(float((a[n].float() - b[n].float()).norm()) for n in names)

    assert distance(saved[4], saved[3]) < distance(saved[4], base) / 2


def _weights_equal(client, peers: list[str], uid: str) -> bool:
    first, *others = (client.expert_state(peer, uid)[0] for peer in peers)
    return all(torch.equal(w, v) for other in others for w, v in zip(first, other, strict=True))


class _ToExperts0And1(torch.nn.Module):
    """A layer's remote experts with every token sent to experts 0 and 1, whatever the router chose."""

    def __init__(self, experts):
        super().__init__()
        self.inner = experts

    def forward(self, hidden, top_k_index, top_k_weights):
        return self.inner(hidden, torch.tensor([0, 1]).expand_as(top_k_index), top_k_weights)


@contextlib.contextmanager
def routed_to_experts_0_and_1(model):
    """Every token of every layer goes to experts 0 and 1 (a's): the routers trained by the tests before may
    send a's experts no token in the step that matters."""
    blocks = [layer.mlp for layer in model.model.layers]
    originals = [block.experts for block in blocks]
    for block, experts in zip(blocks, originals, strict=True):
        block.experts = _ToExperts0And1(experts)
    try:
        yield
    finally:
        for block, experts in zip(blocks, originals, strict=True):
            block.experts = experts


def test_the_experts_dashboard_shows_every_expert_servers_series(servers, remote, metrics_ports, tmp_path):
    """After the training above: a real Prometheus scraping the three servers has data for every query of
    Grafana's experts dashboard, tokens for the experts trained, and no failure."""
    targets = [f"127.0.0.1:{port}" for port in metrics_ports.values()]
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "potluck-experts", "static_configs": [{"targets": targets}]}],
    }
    variables = {"$run_id": "moe-run", "$__rate_interval": "20s", "$__interval": "5s", "$__range": "5m"}
    with running_prometheus(config, tmp_path) as url:
        every_dashboard_query_returns_data(url, variables, 120, "potluck-experts.json")
        tokens = query(url, 'sum by (expert) (potluck_expert_tokens_total{run_id="moe-run"})')["data"][
            "result"
        ]
        served = {r["metric"]["expert"] for r in tokens if float(r["value"][1]) > 0}
        sent = {uid for uid, n in remote[1].metrics.tokens_by_expert.items() if n > 0}
        assert sent and sent <= served <= set(ALL_UIDS)  # the servers count what this trainer sent (and more)
        failures = query(url, 'sum(potluck_expert_request_failures_total{run_id="moe-run"})')["data"][
            "result"
        ]
        assert float(failures[0]["value"][1]) == 0
        loads = query(url, "potluck_expert_server_load")["data"]["result"]
        assert len(loads) == len(PLACEMENT) and all(0 <= float(r["value"][1]) <= 1 for r in loads)


def test_replicas_of_an_expert_hold_equal_weights_after_averaging(servers, remote, batch, family_model):
    model, client = remote
    model.train()
    peer_of = {peer.name: peer.peer_id() for peer in servers.peers}
    for uid in ("0.1", "1.1"):  # only a trains them: c's copy moves by averaging alone
        client.directory.last_good[uid] = peer_of["a"]
    with routed_to_experts_0_and_1(model):  # so that expert 1 of each layer trains
        model(batch, labels=batch).loss.backward()
    trained = {"0.1", "1.1"}
    assert client.metrics.rerouted == 0 and client.metrics.failures == 0  # a served them
    on_a = {uid: client.expert_state(peer_of["a"], uid) for uid in sorted(trained)}

    checkpoint = load_experts(family_model("mixtral"), [parse_uid(u) for u in trained])
    for uid in sorted(trained):
        wait_until(lambda u=uid: _weights_equal(client, [peer_of["a"], peer_of["c"]], u), 60,
                   f"expert {uid}'s replicas on a and c equal")  # fmt: skip
        weights, _ = client.expert_state(peer_of["c"], uid)
        original = checkpoint[parse_uid(uid)]
        assert not torch.equal(weights[0], original.gate.weight), uid  # c's copy took a's training
        # each replica weighs in with the steps it took since its last round: c, which took none, takes a's
        # expert, and a's does not move back towards c's untrained copy (equal weights: halfway)
        assert all(torch.allclose(w, t, atol=1e-6) for w, t in zip(weights, on_a[uid][0], strict=True)), uid


def test_training_goes_on_when_an_expert_server_is_killed(servers, remote, batch):
    model, client = remote
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    a = next(peer for peer in servers.peers if peer.name == "a")
    for uid in ("0.1", "1.1"):  # a serves them when it dies (else the throughput a server measured picks)
        client.directory.last_good[uid] = a.peer_id()
    losses = []
    with routed_to_experts_0_and_1(model):
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
    # only a's experts failed (the first failure bans a: its other experts are not tried again)
    assert metrics.failures_by_expert and set(metrics.failures_by_expert) <= {"0.0", "0.1", "1.0", "1.1"}


def test_a_restarted_expert_server_takes_its_replicas_state_and_serves_again(servers, remote, batch):
    model, client = remote
    model.train()
    peer_of = {peer.name: peer.peer_id() for peer in servers.peers}
    b = next(peer for peer in servers.peers if peer.name == "b")
    again = servers.start_peer(
        "a-again", ["--role", "experts", "--experts", PLACEMENT["a"]], initial_peers=[b.join_address()]
    )
    servers.wait_for_event(again, "serving", 180)
    downloaded = {event["uid"]: event for event in again.events("expert_downloaded")}
    assert set(downloaded) == {"0.1", "1.1"}  # expert 0 has no replica: it starts from the checkpoint
    for uid, event in downloaded.items():
        _, steps = client.expert_state(peer_of["c"], uid)
        assert event["donor"] == peer_of["c"] and event["adopted"] and event["steps"] == steps, event
        assert _weights_equal(client, [again.peer_id(), peer_of["c"]], uid), uid

    wait_until(lambda: again.peer_id() in client.directory.candidates("0.0") or client.directory.refresh(force=True),
               60, "the trainer seeing the restarted server")  # fmt: skip
    dropped, tokens = client.metrics.dropped, client.metrics.tokens_by_expert["0.0"]
    with routed_to_experts_0_and_1(model):
        loss = model(batch, labels=batch).loss
        loss.backward()
    assert client.metrics.tokens_by_expert["0.0"] > tokens  # expert 0 was asked
    assert torch.isfinite(loss) and client.metrics.dropped == dropped  # and served again
