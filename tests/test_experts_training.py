"""Training through expert servers learns as local training does (issue 20, acceptance 1; the long run with
figures is ``bench/moe.py``): two ``run-peer --role experts`` servers, ``a`` with experts 0-1 and ``b`` with 2-3 of
both MoE layers of the tiny Mixtral, and a trainer in this process, against the same checkpoint trained in this
process on the same batches with the spec's AdamW:

- ``local``: ``from_pretrained``, as anyone would train it; transformers keeps a layer's experts in one tensor, so
  its AdamW steps every expert at every step, on momentum alone when the batch routed it no token;
- ``separate``: the same model with each expert a module of its own
  (``tools/expert_swarm.load_with_separate_experts``), so that AdamW steps only the experts a batch reached, as the
  servers do (one step per backward request): the remote run must compute what this one computes.
"""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from potluck.peer.averaging.gradient import adamw_with_state
from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.exact_match import held_out_loss
from potluck.peer.training.model import NO_HUB_KERNELS, load_tokenizer
from potluck.protocols.runspec import load_run_spec
from potluck.tools.expert_swarm import load_with_separate_experts, moe_trainer
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
    separate = load_with_separate_experts(spec.model.name_or_path)
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
        models = {"remote": remote, "local": local, "separate": separate}
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
    # a server steps an expert once per training step that routed it tokens: each of them, and never more
    assert all(0 < steps <= STEPS for steps in expert_steps.values()), expert_steps
    # one checkpoint: the same model to start; both learn
    assert start["remote"] == pytest.approx(start["local"], rel=1e-5), start
    assert all(end[name] < 0.8 * start[name] for name in models), (start, end)
    # what the servers compute and how they step is what separate experts do locally
    assert end["remote"] == pytest.approx(end["separate"], rel=1e-4), end
    # NOTE: within 10 % of the fused local model here (seed 0: 0.954). The gap is how AdamW treats an expert a
    # batch routes no token to (most steps here leave one or two idle); over data orders it spans about 0.91-1.09
    # at these settings, and wider later in training (docs/benchmarks.md, "Expert shards: bench/moe.py").
    assert end["remote"] == pytest.approx(end["local"], rel=0.10), end
