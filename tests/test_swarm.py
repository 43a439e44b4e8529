"""Real peers in separate processes on 127.0.0.1 train one model together."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from potluck.peer.training.checkpoint import list_checkpoints
from potluck.peer.training.exact_match import evaluate_spec
from potluck.peer.training.model import PROMPT_ENCODER_FILE, build_model
from potluck.protocols.runspec import load_run_spec
from potluck.tools.coordinator_process import free_port
from tests.helpers import metric, scrape, start_first, wait_until

pytestmark = pytest.mark.slow


def weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dir / "model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def checkpoint_at(save_dir: Path, step: int) -> Path:
    found = {c.global_step: c.path for c in list_checkpoints(save_dir)}
    assert step in found, f"no checkpoint of step {step} in {save_dir}: {sorted(found)}"
    return found[step]


ON_GPU = pytest.param(
    ["--gpu", "0"],
    id="gpu",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)
"""Both peers on CUDA device 0: gradients, averaging and checkpoints from GPU tensors."""


@pytest.mark.timeout(400)
@pytest.mark.parametrize("device", [pytest.param([], id="cpu"), ON_GPU])
def test_two_peers_end_equal_and_loss_falls(device, make_spec, local_swarm, tmp_path):
    steps = 12
    spec_path = make_spec(max_global_steps=steps)
    swarm = local_swarm(spec_path)
    port = free_port()
    first, address = start_first(
        swarm, "a", ["--save-dir", str(tmp_path / "a"), "--min-peers", "2", "--metrics-port", str(port), *device],
        tmp_path,
    )  # fmt: skip
    swarm.start_peer(
        "b", ["--save-dir", str(tmp_path / "b"), "--min-peers", "2", *device], initial_peers=[address]
    )
    swarm.wait_for_address(first)  # its metrics endpoint is up by then

    # while training: the peer's Prometheus endpoint reports the swarm
    text = wait_until(
        lambda: (t := scrape(port)) and metric(t, "potluck_peers") == 2 and t,
        timeout=240,
        what="both peers in peer a's metrics",
    )
    assert metric(text, "potluck_samples_total") > 0
    assert metric(text, "potluck_averaging_rounds_total") is not None

    assert swarm.wait_all(timeout=300) == [0, 0], first.log()[-3000:]
    a, b = weights(checkpoint_at(tmp_path / "a", steps)), weights(checkpoint_at(tmp_path / "b", steps))
    assert max_difference(a, b) <= 1e-5
    # Equal weights alone do not show that the peers averaged gradients: state averaging keeps peers that
    # step apart equal too (and they then learn like one peer with half the batch). A peer's first
    # step may come before it has fetched the other's progress record.
    summary = first.summary()
    assert summary is not None and summary.rounds.alone <= 2, first.log()[-3000:]
    # what a volunteer sizes their card by: reported on a GPU, absent on the CPU
    assert (summary.peak_gpu_memory_bytes or 0) > 0 if device else summary.peak_gpu_memory_bytes is None
    # where its startup went, phase by phase, in order, ending at its first step (bench/startup.py)
    (startup,) = first.events("startup")
    phases = list(startup["phases"].values())
    assert list(startup["phases"]) == [
        "imports", "inputs_checked", "model_loaded", "dht_joined", "strategy_ready", "peers_found",
        "state_loaded", "first_step",
    ] and phases == sorted(phases) and phases[0] > 0, startup  # fmt: skip

    spec = load_run_spec(spec_path)
    before = evaluate_spec(spec, checkpoint=None)
    after = evaluate_spec(spec, checkpoint=checkpoint_at(tmp_path / "a", steps))
    assert after.loss < before.loss * 0.8, (before, after)


@pytest.mark.timeout(400)
def test_late_joiner_loads_the_swarms_state_before_its_first_step(make_spec, local_swarm, tmp_path):
    # a slower global step (4 local batches per peer) keeps the swarm mid-epoch most of the time
    spec_path = make_spec(max_global_steps=200, batch={"target_batch_size": 512, "per_peer_batch_size": 64},
                          checkpoint={"save_every": 1, "keep": 0})  # fmt: skip
    swarm = local_swarm(spec_path)
    _, address = start_first(swarm, "a", ["--save-dir", str(tmp_path / "a"), "--min-peers", "2"], tmp_path)
    swarm.start_peer("b", ["--save-dir", str(tmp_path / "b"), "--min-peers", "2"], initial_peers=[address])
    wait_until(
        lambda: any(c.global_step >= 3 for c in list_checkpoints(tmp_path / "a")), 240, "global step 3"
    )

    # --max-steps 1 is already reached: the newcomer downloads the state, saves it and leaves
    late = swarm.start_peer("late", ["--save-dir", str(tmp_path / "late"), "--max-steps", "1"])
    assert late.process.wait(timeout=180) == 0, late.log()[-3000:]
    loads = late.summary().state_loads
    assert loads, late.log()[-3000:]
    downloaded = loads[0].global_step
    assert downloaded >= 3
    (saved,) = list_checkpoints(tmp_path / "late")
    mine = weights(saved.path)
    donors = [weights(checkpoint_at(tmp_path / name, downloaded)) for name in ("a", "b")]
    # The newcomer copied one donor. The two agree to 1e-5 unless a gradient round failed for one of
    # them (a timeout on a loaded machine); then state averaging pulls them together a step later,
    # and the newcomer must still be within the swarm's own spread of it.
    spread = max_difference(*donors)
    assert min(max_difference(mine, donor) for donor in donors) <= max(1e-5, spread)


@pytest.mark.timeout(300)
def test_restart_resumes_from_its_checkpoint(make_spec, local_swarm, tmp_path):
    spec_path = make_spec(
        batch={"target_batch_size": 64, "per_peer_batch_size": 64}, checkpoint={"save_every": 2, "keep": 2}
    )
    save_dir = tmp_path / "solo"
    identity = ["--identity-path", str(tmp_path / "peer.id")]
    swarm = local_swarm(spec_path)
    first = swarm.start_peer("first", ["--save-dir", str(save_dir), "--max-steps", "4", *identity])
    assert first.process.wait(timeout=180) == 0, first.log()[-3000:]
    assert [c.global_step for c in list_checkpoints(save_dir)] == [2, 4]

    second = swarm.start_peer(
        "second", ["--save-dir", str(save_dir), "--max-steps", "6", *identity], initial_peers=[]
    )
    assert second.process.wait(timeout=180) == 0, second.log()[-3000:]
    summary = second.summary()
    assert summary.resumed_from == 4, summary
    # one peer alone: each local step is a global step, so only the two missing steps were trained
    assert (summary.global_step, summary.local_steps, summary.exit_reason) == (6, 2, "max_steps"), summary
    assert [c.global_step for c in list_checkpoints(save_dir)] == [4, 6]
    assert summary.checkpoint == str(checkpoint_at(save_dir, 6))
    peer_ids = [p.summary().peer_id for p in (first, second)]
    assert peer_ids[0] is not None and peer_ids[0] == peer_ids[1], "--identity-path did not keep the peer id"


@pytest.mark.timeout(300)
def test_sigterm_leaves_cleanly_and_saves(make_spec, local_swarm, tmp_path):
    spec_path = make_spec(max_global_steps=100000, batch={"target_batch_size": 64, "per_peer_batch_size": 64})
    swarm = local_swarm(spec_path)
    peer = swarm.start_peer("solo", ["--save-dir", str(tmp_path / "solo")])
    wait_until(lambda: peer.events("global_step"), 180, "a first global step")
    peer.process.send_signal(signal.SIGTERM)
    assert peer.process.wait(timeout=60) == 0, peer.log()[-3000:]
    assert peer.summary().exit_reason == "signal", peer.log()[-3000:]
    assert list_checkpoints(tmp_path / "solo"), "the final checkpoint was not written"


@pytest.mark.timeout(300)
def test_a_peer_that_leaves_with_ctrl_c_does_not_stall_the_other(make_spec, local_swarm, tmp_path):
    """Ctrl-C on one of two peers: the leaver withdraws its progress record, so the peer left behind
    steps on alone at once. It used to count the leaver until its record expired, and waited for it in
    rounds that failed after the whole averaging_timeout: one global step per 15 s for a minute."""
    spec_path = make_spec(max_global_steps=100000)  # averaging_timeout 15 s, matchmaking_time 0.5 s
    swarm = local_swarm(spec_path)
    stays, address = start_first(
        swarm, "stays", ["--save-dir", str(tmp_path / "stays"), "--min-peers", "2"], tmp_path
    )
    leaves = swarm.start_peer(
        "leaves", ["--save-dir", str(tmp_path / "leaves"), "--min-peers", "2"], initial_peers=[address]
    )
    wait_until(lambda: len(leaves.events("global_step")) >= 3, 180, "three global steps together")
    leaves.process.send_signal(signal.SIGINT)
    assert leaves.process.wait(timeout=30) == 0, leaves.log()[-3000:]
    assert leaves.summary().exit_reason == "signal"
    left_at, log_offset = leaves.events("summary")[-1]["time"], len(stays.log())
    after = wait_until(
        lambda: (steps := [e for e in stays.events("global_step") if e["time"] > left_at])[5:] and steps,
        60,
        "six global steps of the peer left behind",
    )
    assert after[0]["time"] - left_at < 5.0, f"first step {after[0]['time'] - left_at:.1f} s after the leave"
    rounds = [e for e in stays.events("averaging_round") if e["time"] > left_at]
    assert all(r["outcome"] == "alone" for r in rounds), rounds
    assert "Traceback" not in stays.log()[log_offset:], stays.log()[log_offset:][-3000:]


@pytest.mark.timeout(300)
def test_sigterm_with_a_partner_that_hung_exits_within_seconds(make_spec, local_swarm, tmp_path):
    """A partner that stops answering (SIGSTOP: a machine that froze) holds a round until
    averaging_timeout. A peer asked to leave then took 60 s (its gradient round's 30 s, then its state
    round's); it now gives running rounds 2 s, skips the step whose round had not ended, and leaves
    with the state of its last global step, saved."""
    spec_path = make_spec(
        max_global_steps=100000,
        averaging={"matchmaking_time": 2, "averaging_timeout": 30, "target_group_size": 2},
    )
    swarm = local_swarm(spec_path)
    leaver, address = start_first(
        swarm, "leaver", ["--save-dir", str(tmp_path / "leaver"), "--min-peers", "2"], tmp_path
    )
    frozen = swarm.start_peer("frozen", ["--min-peers", "2"], initial_peers=[address])
    wait_until(lambda: len(frozen.events("global_step")) >= 2, 180, "two global steps together")
    frozen.process.send_signal(signal.SIGSTOP)  # the main process only: its DHT and averagers still answer
    try:
        time.sleep(3)  # the scenario: the partner has been frozen for 3 s, the leaver's round waits on it
        leaver.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert leaver.process.wait(timeout=30) == 0, leaver.log()[-3000:]
        assert time.monotonic() - signalled < 10, f"left {time.monotonic() - signalled:.1f} s after SIGTERM"
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    assert leaver.summary().exit_reason == "signal"
    assert "Traceback" not in leaver.log(), leaver.log()[-3000:]
    last_step = leaver.summary().global_step
    checkpoint_at(tmp_path / "leaver", last_step)


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_torch_thread")  # the evaluations in this process
def test_two_peers_train_a_p_tuning_adapter_and_a_restarted_peer_resumes_it(make_spec, local_swarm, tmp_path):
    """The hardest of the prompt-learning adapters in a real swarm: P-tuning's virtual tokens come out of an MLP,
    and the MLP is what the peers average. Both peers end with the same prompt encoder, the held-out loss falls,
    and a restarted peer resumes the encoder from its checkpoint (tests/test_model.py covers every adapter
    kind's checkpoint, resume, evaluation and generation in one process)."""
    steps = 4
    spec_path = make_spec(
        adapter={"kind": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 32},
        optimizer={"lr": 0.01},
        averaging={"target_group_size": 2},  # a fixed pair: each round starts once both are in
        max_global_steps=steps,
    )
    swarm = local_swarm(spec_path)
    identity = ["--identity-path", str(tmp_path / "a.id")]
    first, address = start_first(
        swarm, "a", ["--save-dir", str(tmp_path / "a"), "--min-peers", "2"], tmp_path
    )
    swarm.start_peer("b", ["--save-dir", str(tmp_path / "b"), "--min-peers", "2"], initial_peers=[address])
    assert swarm.wait_all(timeout=240) == [0, 0], first.log()[-3000:]

    encoders = [load_file(checkpoint_at(tmp_path / name, steps) / PROMPT_ENCODER_FILE) for name in ("a", "b")]
    assert any(name.startswith("mlp_head.") for name in encoders[0])
    assert max_difference(*encoders) <= 1e-5
    assert first.summary().rounds.alone <= 2, first.log()[-3000:]  # the gradients were averaged
    spec = load_run_spec(spec_path)
    before = evaluate_spec(spec, checkpoint=None)
    after = evaluate_spec(spec, checkpoint=checkpoint_at(tmp_path / "a", steps))
    assert after.loss < before.loss - 0.05, (before, after)

    again = swarm.start_peer(
        "a-again",
        ["--save-dir", str(tmp_path / "a"), "--max-steps", str(steps + 1), *identity],
        initial_peers=[],
    )
    assert again.process.wait(timeout=180) == 0, again.log()[-3000:]
    summary = again.summary()
    # alone, a global step takes two local batches (target 128, 64 a batch)
    assert (summary.resumed_from, summary.global_step, summary.local_steps) == (steps, steps + 1, 2), summary
    resumed = load_file(checkpoint_at(tmp_path / "a", steps + 1) / PROMPT_ENCODER_FILE)
    # one more step from the saved encoder: near it, not back at a fresh initialisation
    fresh = build_model(spec, torch.device("cpu")).prompt_encoder["default"].state_dict()
    assert max_difference(resumed, encoders[0]) < max_difference(encoders[0], fresh)
