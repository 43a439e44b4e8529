"""Training through expert servers learns what local training does (issue 20, acceptance 1; the long run with
figures is ``bench/moe.py``): two ``run-peer --role experts`` servers, ``a`` with experts 0-1 and ``b`` with 2-3 of
both MoE layers of the tiny Mixtral, and a trainer in this process, against the same checkpoint loaded by
``from_pretrained`` and trained in this process on the same batches with the spec's AdamW. transformers keeps a
layer's experts in one tensor, so that AdamW steps every expert at every step, on momentum alone when the batch
routed it no token; the servers step a routed expert on its backward request and the others on the trainer's idle
steps (``client/expert_calls.py``), so the two must train the same weights.
"""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from potluck.peer.averaging.gradient import adamw_with_state
from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.exact_match import held_out_loss
from potluck.peer.training.model import NO_HUB_KERNELS, load_tokenizer
from potluck.protocols.runspec import load_run_spec
from potluck.tools.expert_swarm import moe_trainer
from tests.conftest import serving_experts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
STEPS = 25
EXPERTS = 8
"""2 MoE layers of 4."""


@pytest.mark.timeout(180)
def test_remote_experts_train_as_the_same_model_does_locally(write_moe_spec):
    # no clipping and a constant rate: a server clips each expert's gradient on its own and counts a schedule in
    # that expert's steps, where the local model would clip and count over all its parameters
    spec_path = write_moe_spec(
        "moe-training", optimizer={"lr": 0.003}, batch={"target_batch_size": 32, "per_peer_batch_size": 32}
    )
    spec = load_run_spec(spec_path)
    tokenizer = load_tokenizer(spec.model)
    local = AutoModelForCausalLM.from_pretrained(spec.model.name_or_path, **NO_HUB_KERNELS)
    batches = PeerDataStream(spec.data, tokenizer, spec.batch.per_peer_batch_size).batches(spec.seed)

    def held_out(model) -> float:
        return held_out_loss(
            model, tokenizer, spec.data.eval_path, max_length=spec.data.max_length, limit=None
        )

    with (
        serving_experts(spec_path, {"a": "0-1", "b": "2-3"}) as swarm,
        moe_trainer(spec, swarm.peers) as trainer,
    ):
        remote, client = trainer
        models = {"remote": remote, "local": local}
        start = {name: held_out(model) for name, model in models.items()}
        sides = [
            (model.train(), adamw_with_state(model.parameters(), spec.optimizer)) for model in models.values()
        ]
        for _ in range(STEPS):
            batch = next(batches)
            for model, optimizer in sides:
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        end = {name: held_out(model) for name, model in models.items()}
        served_by = {
            uid: peer.peer_id()
            for peer in swarm.peers
            for uid in client.directory.servers[peer.peer_id()].uids
        }
        expert_steps = {
            uid: client.expert_state(peer_id, uid)[1] for uid, peer_id in sorted(served_by.items())
        }

    metrics = client.metrics
    assert metrics.failures == metrics.dropped == metrics.backward_dropped == 0, metrics
    assert len(expert_steps) == EXPERTS, expert_steps
    # every expert steps once per training step, on its tokens' gradient or on a zero one, as local AdamW does
    assert expert_steps == dict.fromkeys(expert_steps, STEPS), expert_steps
    assert metrics.idle_steps > 0 and metrics.idle_steps_failed == 0, (
        metrics
    )  # some steps left an expert idle
    # one checkpoint: the same model to start; both learn, to the same weights up to rounding
    assert start["remote"] == pytest.approx(start["local"], rel=1e-5), start
    assert all(end[name] < 0.8 * start[name] for name in models), (start, end)
    assert end["remote"] == pytest.approx(end["local"], rel=1e-4), end
