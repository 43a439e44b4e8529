"""A LoRA adapter trained inside remote spans: a client's gradients train it on the servers, the two
replicas of a span average it, and the held-out loss falls; a replica that joins late downloads it, and a
restarted server resumes it from its checkpoint. Real shard servers on loopback."""

from __future__ import annotations

import signal

import pytest
import torch
import yaml

from potluck.peer.shard.client.remote_model import open_remote_model
from potluck.peer.training.data import BatchStream, PeerDataStream
from potluck.peer.training.model import load_tokenizer
from potluck.peer.training.stages.sft import SupervisedFineTuning
from potluck.protocols.runspec import load_run_spec
from potluck.protocols.shards import read_shards
from tests.conftest import _TrackedSwarm
from tests.helpers import wait_until
from tests.test_shards import _held_out_loss, _wait_for_event, run_client

pytestmark = pytest.mark.slow


def _write_spec(tiny_assets, tmp_path):
    spec = {
        "run_id": "shard-lora",
        "model": {"name_or_path": str(tiny_assets["model"])},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"path": str(tiny_assets["train"]), "eval_path": str(tiny_assets["eval"]), "max_length": 16},
        "optimizer": {"lr": 0.01},
        "batch": {"target_batch_size": 32, "per_peer_batch_size": 32},
        "averaging": {"matchmaking_time": 1.0, "averaging_timeout": 10},
        "seed": 0,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _batches(spec) -> BatchStream:
    return PeerDataStream(spec.data, load_tokenizer(spec.model), spec.batch.per_peer_batch_size).batches(0)


def _train(model, batches: BatchStream, steps: int) -> None:
    """``steps`` client steps, each on the stream's next batch: one backward request to every span on the route.
    One stream for all of a test's steps: a stream started again repeats its first batches, and a client that
    steps on those over and over overfits them (the held-out loss rises)."""
    stage = SupervisedFineTuning()
    for _ in range(steps):
        stage.loss(model, next(batches)).backward()


@pytest.fixture
def lora_swarm(tiny_assets, tmp_path):
    path = _write_spec(tiny_assets, tmp_path)
    swarm = _TrackedSwarm(path, tmp_path / "servers", extra_args=["--role", "shard"])
    try:
        first = swarm.start_peer("span0", ["--blocks", "0:1"])
        address = swarm.wait_for_address(first)
        for name in ("span1-a", "span1-b"):
            swarm.start_peer(name, ["--blocks", "1:2"], initial_peers=[address])
        for peer in swarm.peers:
            _wait_for_event(peer, "serving")
        yield load_run_spec(path), address, swarm, path
    finally:
        swarm.stop(grace=10)
    # SIGTERM, not the SIGKILL after the grace: a lone replica's averaging round must not hold its exit
    codes = [p.process.returncode for p in swarm.peers]  # the servers, and clients a test ran
    assert codes == [0] * len(codes), "a server ignored SIGTERM for 10 s"


def test_server_side_lora_trains_through_two_replicas_and_ends_averaged(lora_swarm):
    spec, address, swarm, path = lora_swarm
    # route_spread: the client spreads its steps over both replicas of blocks 1:2
    dht, model = open_remote_model(spec, [address], route_spread=4.0)
    try:
        wait_until(lambda: len(read_shards(dht, spec.run_id).records) == 3, 60, "3 shard announcements")
        replicas = [a.peer_id for a in read_shards(dht, spec.run_id).records.values() if a.start == 1]
        before = _held_out_loss(model, spec)
        batches = _batches(spec)

        # a replica weighs in with the span steps it took since its last round: one that no client used takes
        # the trained one's adapter, which stays where it is (equal weights pulled it halfway back)
        trained, idle = replicas
        model.client.router.ban(idle)
        _train(model, batches, 8)
        model.client.router.unban(idle)
        adapter, steps = model.client.adapter_state(trained, 1, 2)
        assert steps == 8
        wait_until(lambda: _close(model.client.adapter_state(idle, 1, 2)[0], adapter), 60, "the idle replica")
        assert _close(model.client.adapter_state(trained, 1, 2)[0], adapter)

        _train(model, batches, 16)

        # both replicas train: the route spreads steps over replicas of similar measured speed, and on a loaded
        # machine one may measure slow for a while (a two-worker suite: all 16 steps to one replica); it is
        # probed again once its measure is stale (Router.reprobe_seconds), so the client trains on meanwhile
        def both_trained() -> list[int] | None:
            steps = [model.client.adapter_state(peer, 1, 2)[1] for peer in replicas]
            if all(count > 0 for count in steps):
                return steps
            _train(model, batches, 4)
            return None

        wait_until(both_trained, 180, "a step on each replica")

        def averaged():
            a, b = (model.client.adapter_state(peer, 1, 2)[0] for peer in replicas)
            return _close(a, b) and a

        adapter = wait_until(averaged, 90, "the two replicas' adapters to be averaged", interval=1.0)
        assert any(t.abs().sum() > 0 for t in adapter)
        # measured once the replicas hold one adapter: through a replica that has just taken its first steps
        # (the others' span steps were co-adapted with the other one) the loss was above the untrained model's
        after = _held_out_loss(model, spec)
        assert after < before, (before, after)

        # run-peer --role client trains the servers' adapter: one span step per client step (the span has one
        # server); DPO's reference passes, through the same servers with their adapter off, take none
        span0 = next(a.peer_id for a in read_shards(dht, spec.run_id).records.values() if a.start == 0)
        for stage in ("sft", "dpo"):
            before_steps = model.client.adapter_state(span0, 0, 1)[1]
            run_client(
                swarm, path, {"kind": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}, stage
            )
            assert model.client.adapter_state(span0, 0, 1)[1] == before_steps + 2, stage
    finally:
        model.client.shutdown()
        dht.shutdown()


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_late_replica_downloads_the_adapter_and_a_restart_resumes_it(tiny_assets, tmp_path):
    path = _write_spec(tiny_assets, tmp_path)
    spec = load_run_spec(path)
    save_dir = tmp_path / "span0-checkpoints"
    swarm = _TrackedSwarm(path, tmp_path / "servers", extra_args=["--role", "shard"])
    try:
        first = swarm.start_peer("span0", ["--blocks", "0:1", "--save-dir", str(save_dir)])
        address = swarm.wait_for_address(first)
        replica = swarm.start_peer("span1-a", ["--blocks", "1:2"], initial_peers=[address])
        for peer in swarm.peers:
            _wait_for_event(peer, "serving")
        dht, model = open_remote_model(spec, [address])
        try:
            wait_until(lambda: len(read_shards(dht, spec.run_id).records) == 2, 60, "2 shard announcements")
            _train(model, _batches(spec), 3)
            trained, trained_steps = model.client.adapter_state(replica.peer_id(), 1, 2)
            assert trained_steps == 3  # one span step per backward request (accumulate_backwards: 1)
            span0, span0_steps = model.client.adapter_state(first.peer_id(), 0, 1)

            late = swarm.start_peer("span1-b", ["--blocks", "1:2"], initial_peers=[address])
            _wait_for_event(late, "serving")
            (loaded,) = late.events("state_loaded")  # before it served
            assert (loaded["donor"], loaded["global_step"]) == (replica.peer_id(), 3)
            assert _same(model.client.adapter_state(late.peer_id(), 1, 2)[0], trained)
            assert model.client.adapter_state(late.peer_id(), 1, 2)[1] == 3
            assert _same(model.client.adapter_state(replica.peer_id(), 1, 2)[0], trained)

            # a clean exit checkpoints the span; the restart (no --blocks) serves that span with that adapter
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(timeout=30) == 0
            assert first.events("checkpoint")[-1]["global_step"] == span0_steps
            restarted = swarm.start_peer(
                "span0-again", ["--save-dir", str(save_dir)], initial_peers=[swarm.wait_for_address(replica)]
            )
            assert _wait_for_event(restarted, "serving") == (0, 1)
            assert restarted.events("resumed")[0]["global_step"] == span0_steps
            resumed, resumed_steps = model.client.adapter_state(restarted.peer_id(), 0, 1)
            assert resumed_steps == span0_steps and _same(resumed, span0)
        finally:
            model.client.shutdown()
            dht.shutdown()
    finally:
        swarm.stop(grace=10)
