"""A server that refuses every call as malformed (``bad_request``) cannot stop a client (issue 17: a malicious
peer never corrupts another's state): real ``run-peer`` servers on loopback, an honest one and one started through
``tests/refusing_peer.py`` beside it, serving the same blocks or experts, and a client in this process.

The refusing server announces the most throughput, so clients try it first. Its refusal bans it and the call goes to
the honest replica (counted in ``refused``); a call that both servers refuse is the caller's bug, raised naming both
answers, and neither server stays banned for it (``peer/shard/client/refusals.py``).
"""

from __future__ import annotations

import pytest
import torch

from potluck.peer.shard import wire
from potluck.peer.shard.client.remote_model import open_remote_model
from potluck.peer.training.model import load_tokenizer
from potluck.protocols.runspec import load_run_spec
from potluck.protocols.shards import read_shards
from potluck.tools.expert_swarm import moe_trainer
from tests.conftest import serving_experts
from tests.helpers import wait_until
from tests.refusing_peer import REFUSAL, REFUSING_PEER

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]
PROBLEMS = ["1+2=3", "4+5=9", "3+3=6", "7+1=8"]


def _assert_names_both(error: pytest.ExceptionInfo, honest: str, refusing: str, honest_says: str) -> None:
    assert error.value.kind == wire.BAD_REQUEST
    message = str(error.value)
    assert honest in message and refusing in message, message
    assert REFUSAL in message and honest_says in message, message


def test_an_expert_server_refusing_every_call_is_banned_and_its_replica_trains(write_moe_spec):
    spec_path = write_moe_spec("moe-refused", batch={"target_batch_size": 4, "per_peer_batch_size": 4})
    spec = load_run_spec(spec_path)
    ids = load_tokenizer(spec.model)(PROBLEMS, return_tensors="pt")["input_ids"]
    placement = {"honest": "0-3", "refusing": "0-3"}  # every expert on both
    with (
        serving_experts(spec_path, placement, entries={"refusing": REFUSING_PEER}) as swarm,
        moe_trainer(spec, swarm.peers) as (model, client),
    ):
        honest, refusing = (peer.peer_id() for peer in swarm.peers)
        assert client.directory.candidates("0.0") == [refusing, honest]  # it announces the most throughput

        with pytest.raises(wire.RemoteError) as error:
            client.forward(0, {0: torch.randn(3, 7)})  # not the model's hidden size: both refuse it
        _assert_names_both(error, honest, refusing, "hidden: shape (3, 7)")
        assert not client.directory.banned(honest) and not client.directory.banned(refusing)
        assert client.metrics.refused == 2

        for _ in range(3):
            loss = model(ids, labels=ids).loss
            loss.backward()
            assert torch.isfinite(loss)
        metrics = client.metrics
        assert client.directory.banned(refusing) and not client.directory.banned(honest)

    assert metrics.dropped == metrics.backward_dropped == metrics.idle_steps_failed == 0, metrics
    assert metrics.refused > 2 and metrics.failures == metrics.refused, metrics  # nothing else failed
    assert metrics.rerouted == metrics.refused - 2, metrics  # every refused call answered by the replica
    assert sum(metrics.refused_by_expert.values()) == metrics.refused, metrics


def test_a_span_server_refusing_every_call_is_banned_and_its_replica_serves(make_spec, local_swarm):
    spec_path = make_spec(run_id="refused-spans")
    spec = load_run_spec(spec_path)
    swarm = local_swarm(spec_path)
    flags = ["--role", "shard", "--blocks", "0:2"]
    honest_peer = swarm.start_peer("honest", flags)
    address = swarm.wait_for_address(honest_peer)
    refusing_peer = swarm.start_peer("refusing", flags, initial_peers=[address], entry=REFUSING_PEER)
    for peer in (honest_peer, refusing_peer):
        swarm.wait_for_event(peer, "serving")
    honest, refusing = honest_peer.peer_id(), refusing_peer.peer_id()
    dht, model = open_remote_model(spec, [address], prompt_tokens=4, request_timeout=20.0)
    client = model.client
    try:
        wait_until(lambda: len(read_shards(dht, spec.run_id).records) == 2, 60, "2 shard announcements")
        # a route weighs announced throughput above loopback latency's noise: the refusing server comes first
        client.router.tokens_hint = 10**6
        assert client.router.route(0, 2)[0].peer_id == refusing

        with pytest.raises(wire.RemoteError) as error:
            client.forward(torch.zeros(1, 4, 7))  # not the model's hidden size: both refuse it
        _assert_names_both(error, honest, refusing, "hidden: shape (1, 4, 7)")
        assert not client.router.is_banned(honest) and not client.router.is_banned(refusing)

        ids = load_tokenizer(spec.model)(PROBLEMS, return_tensors="pt")["input_ids"]
        for _ in range(2):  # training steps: forward and backward through the blocks
            (model(ids).logits.square().mean()).backward()
            assert model.prompt.grad is not None and torch.isfinite(model.prompt.grad).all()
        assert client.router.is_banned(refusing) and client.metrics.refused == 3  # the first pass's

        client.router.unban(refusing)  # generation asks it again: its inference steps are refused too
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=3)
        assert generated.shape == (len(PROBLEMS), ids.shape[1] + 3)
        metrics = client.metrics
        assert metrics.refused == metrics.failures == metrics.bans == 4, metrics  # nothing else failed
    finally:
        client.shutdown()
        dht.shutdown()
