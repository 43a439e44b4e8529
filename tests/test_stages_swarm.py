"""Each RLHF stage, run by a real 2-peer swarm (separate processes, hivemind DHT and averaging on loopback),
improves its held-out figure from an SFT warm start (acceptance 1-3 of issue 4).

The warm starts are trained once per module, in-process, by the same stage code (``train_in_process``): they are
inputs here, not what is under test. Measured margins, and the commands that produce them, are in
docs/benchmarks.md ("RLHF stages").

- ``sft``: 400 steps of 256 examples, about 95 % held-out exact-match. The reward model starts from it: a reward
  model can only judge sums as well as its starting model computes them (from a 60-step SFT it stayed near 0.6
  pairwise accuracy).
- ``sft_rl``: the first checkpoint of that run with at least 40 % held-out exact-match (``RL_START_ACCURACY``), the
  start of GRPO and PPO: RL with the 0/1 ``exact_answer`` reward needs a policy that is sometimes right, and room to
  improve (from the 95 % model PPO gained +0.008 in a CI run, below the asserted +0.01). The accuracy climbs
  steeply, at a step that differs between machines although training is seeded (0.17, 0.42, 0.86 at 200, 250,
  300 on one; 0.12, 0.16, 0.35 at 250, 300, 400 on another).
- ``sft_short``: 60 steps of 64 (about 3 %), the start of DPO. The strong SFT already prefers the right sum in
  0.91 of the held-out pairs, and its remaining errors (units digits) are ones it cannot yet tell apart; DPO's
  short run has little to move there (0.907 -> 0.907 in a swarm run), while from the short SFT it has a clear
  signal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from potluck.peer.training.checkpoint import latest_checkpoint
from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.stages import make_stage, stage_context
from potluck.peer.training.stages.data import stage_data
from potluck.peer.training.stages.evaluation import evaluate_stage
from potluck.protocols.runspec import RunSpec, load_run_spec
from tests.helpers import start_first, swarm_story

# generous: the module fixture trains two models, and 2-core CI machines are often shared
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SFT_STEPS, SFT_BATCH, SHORT_SFT_STEPS = 400, 256, 60
RL_START_ACCURACY, RL_CHECK_FROM, RL_CHECK_EVERY, MAX_SFT_STEPS = 0.4, 200, 25, 800
"""The RL warm start is the first checkpoint of the long SFT run, looked at every ``RL_CHECK_EVERY`` steps from
``RL_CHECK_FROM``, whose greedy held-out exact-match reaches ``RL_START_ACCURACY``: a policy that is sometimes right,
with room to improve. A fixed step count was not: the run is seeded, but the step at which accuracy climbs moved
between machines (42 % at step 250 on one; 12 % at 250 and 35 % at 400 on another, where GRPO and PPO then gained
+0.006 to +0.011 and failed)."""


def train_in_process(
    spec: RunSpec, batch_size: int, lr: float, after_step: Callable[[int, Any, Any], bool]
) -> int:
    """Train ``spec``'s stage with plain AdamW in this process until ``after_step(step, model, tokenizer)`` says
    to stop (or ``MAX_SFT_STEPS``); the steps taken."""
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # like each peer (OMP_NUM_THREADS=1): tiny ops spin-wait badly on a shared machine
    try:
        return _train(spec, batch_size, lr, after_step)
    finally:
        torch.set_num_threads(threads)


def _train(spec: RunSpec, batch_size: int, lr: float, after_step: Callable[[int, Any, Any], bool]) -> int:
    torch.manual_seed(spec.seed)
    context = stage_context(spec, torch.device("cpu"), None)
    stage = make_stage(spec.stage, context)
    model = stage.build_model()
    batches = PeerDataStream(
        spec.data, context.tokenizer, batch_size, stage_data(spec, context.tokenizer)
    ).batches(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    for step in range(1, MAX_SFT_STEPS + 1):
        stage.loss(model, next(batches)).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if after_step(step, model, context.tokenizer):
            return step
    return MAX_SFT_STEPS


def save(model, tokenizer, out: Path) -> str:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def warm_start(tiny_assets, tmp_path_factory) -> dict[str, str]:
    """Two SFT runs of the tiny model (module docstring): ``sft`` (``SFT_STEPS``, or 100 steps past ``sft_rl`` where
    that comes later) with ``sft_rl`` (``RL_START_ACCURACY``) on the way, and ``sft_short`` (~3 %)."""
    root = tmp_path_factory.mktemp("warm")
    base = {"run_id": "warm", "model": {"name_or_path": str(tiny_assets["model"])},
            "batch": {"target_batch_size": 8, "per_peer_batch_size": 8}}  # fmt: skip
    sft = RunSpec.model_validate({**base, "data": {"path": str(tiny_assets["train"]), "max_length": 16}})
    untrained = dict.fromkeys(("sft", "sft_rl", "sft_short"), str(tiny_assets["model"]))
    overrides, _, _ = stage_settings("grpo", tiny_assets, untrained)
    saved: dict[str, str] = {}
    accuracy: dict[int, float] = {}  # exact-match of each candidate looked at, by step

    def long_run(step: int, model, tokenizer) -> bool:
        if "sft_rl" not in saved and step >= RL_CHECK_FROM and step % RL_CHECK_EVERY == 0:
            candidate = save(model, tokenizer, root / f"sft_{step}")
            spec = RunSpec.model_validate({**base, "stage": "grpo", **{**overrides, "init_from": candidate}})
            accuracy[step] = evaluate_stage(spec, candidate)["exact_match"]
            if accuracy[step] >= RL_START_ACCURACY:
                saved["sft_rl"] = candidate
        if "sft_rl" in saved and step >= max(SFT_STEPS, max(accuracy) + 100):
            saved["sft"] = save(model, tokenizer, root / "sft")
            return True
        return False

    train_in_process(sft, SFT_BATCH, 3e-3, long_run)
    assert "sft" in saved, f"no SFT checkpoint reached {RL_START_ACCURACY} exact-match: {accuracy}"

    def short_run(step: int, model, tokenizer) -> bool:
        if step < SHORT_SFT_STEPS:
            return False
        saved["sft_short"] = save(model, tokenizer, root / "sft_short")
        return True

    train_in_process(sft, 64, 3e-3, short_run)
    return saved


def stage_settings(stage: str, tiny_assets, warm_start) -> tuple[dict, str, str]:
    """Run-spec overrides of ``stage``, the held-out figure it should move and which way (``up``/``down``)."""
    folder = tiny_assets["train"].parent
    preferences = {
        "path": str(folder / "preferences_train.jsonl"),
        "eval_path": str(folder / "preferences_eval.jsonl"),
    }
    prompts = {"path": str(folder / "prompts_train.jsonl"), "eval_path": str(folder / "prompts_eval.jsonl")}
    # The verifiable reward: the honest figure is the held-out reward, here its exact expectation under the policy
    # (answer_probability: the chance that a sampled rollout is the right answer). A learned reward model is what
    # RL exploits instead (with the tiny task's reward model, GRPO and PPO raised its score while exact-match
    # fell: docs/benchmarks.md); tests/test_pipeline.py runs PPO on a reward model.
    rl = {"reward": "exact_answer", "group_size": 4, "max_new_tokens": 4, "kl_coef": 0.1}
    small = {"target_batch_size": 64, "per_peer_batch_size": 32}
    large = {"target_batch_size": 128, "per_peer_batch_size": 64}
    return {
        # half the rounds of 150 x 128 pairs at 1e-3, for the same pairs: in-process 0.80 and 0.78 against
        # 0.75 and 0.78 held-out pairwise accuracy (two data orders each)
        "rm": ({"init_from": warm_start["sft"], "data": preferences,
                "batch": {"target_batch_size": 256, "per_peer_batch_size": 128},
                "optimizer": {"lr": 2e-3, "warmup_steps": 5, "schedule": "cosine"}, "max_global_steps": 75},
               "pairwise_accuracy", "up"),
        "dpo": ({"init_from": warm_start["sft_short"], "data": preferences, "optimizer": {"lr": 1e-3},
                 "batch": small, "max_global_steps": 40}, "preference_margin", "up"),
        "grpo": ({"init_from": warm_start["sft_rl"], "data": prompts, "rl": rl, "optimizer": {"lr": 1e-4},
                  "batch": small, "max_global_steps": 60}, "answer_probability", "up"),
        "ppo": ({"init_from": warm_start["sft_rl"], "data": prompts, "rl": rl, "optimizer": {"lr": 2e-4},
                 "batch": large, "max_global_steps": 60}, "answer_probability", "up"),
        "distill": ({"teacher": {"path": warm_start["sft"], "temperature": 1.0}, "optimizer": {"lr": 3e-3},
                     "batch": small, "max_global_steps": 10}, "teacher_kl", "down"),
    }[stage]  # fmt: skip


@pytest.mark.parametrize("stage", ["rm", "dpo", "grpo", "ppo", "distill"])
def test_two_peer_stage_improves_its_held_out_figure(
    stage, tiny_assets, warm_start, make_spec, local_swarm, tmp_path
):
    overrides, figure, direction = stage_settings(stage, tiny_assets, warm_start)
    # a swarm of a fixed 2 peers, as the demo's: each round starts once both are in instead of waiting out
    # the matchmaking time, and the state is averaged every 10th step (this test is about the stage's
    # learning; tests/test_swarm.py and tests/test_faults.py run the default rounds)
    fixed_pair = {"target_group_size": 2, "average_state_every": 10}
    spec_path = make_spec(run_id=f"swarm-{stage}", stage=stage, averaging=fixed_pair, **overrides)
    spec = load_run_spec(spec_path)
    before = evaluate_stage(spec, spec.init_from or spec.model.name_or_path)

    swarm = local_swarm(spec_path)
    _, address = start_first(
        swarm, "peer1", ["--save-dir", str(tmp_path / "peer1"), "--min-peers", "2"], tmp_path
    )
    swarm.start_peer(
        "peer2", ["--save-dir", str(tmp_path / "peer2"), "--min-peers", "2"], initial_peers=[address]
    )
    codes = swarm.wait_all(timeout=420)  # the rm run takes ~3 min on a loaded 2-core machine
    assert codes == [0, 0], "\n".join(p.log()[-2000:] for p in swarm.peers)
    assert f"{stage} metrics of the last batch" in swarm.peers[0].log()

    checkpoint = latest_checkpoint(tmp_path / "peer1", spec.run_id)
    assert checkpoint is not None and checkpoint.global_step == spec.max_global_steps
    after = evaluate_stage(spec, str(checkpoint.path))
    print(f"{stage}: {figure} {before[figure]:.3f} -> {after[figure]:.3f}  (all: {before} -> {after})")
    if direction == "up":
        # Margins vary between runs (peers' data order and averaging timing differ each time); measured ones are
        # in docs/benchmarks.md. DPO's held-out preference accuracy is a count of 248 pairs that moves only when
        # a pair flips (-0.004..+0.097, equal before and after in a CI run); the mean log-prob gap it widens moved
        # +0.65..+0.84 nats in 4 runs of 20 steps but -0.16 in a suite run, and +0.79..+1.49 in 4 runs of 40: it
        # must widen by at least 0.2. From ``sft_rl`` GRPO (then 30 steps) raised the expected reward
        # (answer_probability) by +0.112..+0.113 and PPO by +0.147..+0.159 in 3 runs each on one machine (from
        # ``sft``, at 0.895, PPO gained +0.008 in a CI run); greedy exact-match rose 0.42 -> 0.66..0.72, but moves
        # only when an argmax flips: not asserted. On another machine, whose seeded SFT run reached 40 % only at
        # step 425 (expected reward 0.352), GRPO gained +0.025 in 30 steps (twice; also at 3x the learning rate) and
        # +0.038 and +0.026 in 60, PPO +0.058, +0.059 and +0.049 (a suite run) in 60: both run 60 steps and
        # must gain +0.02.
        # The reward model ended at 0.714 in one run and at 0.629 (from a fresh head's 0.532) in a suite run: the
        # peers' data orders are seeded by their peer ids, new every run, and the rounds' timing varies. It
        # must gain clearly (+0.05) and end clearly above chance (0.6).
        margin = {"rm": 0.05, "dpo": 0.2, "grpo": 0.02, "ppo": 0.02}[stage]
        if not after[figure] > before[figure] + margin:
            other = latest_checkpoint(tmp_path / "peer2", spec.run_id)
            theirs = evaluate_stage(spec, str(other.path)) if other is not None else None
            pytest.fail(f"{figure} did not gain {margin}: {before} -> {after} (peer2's last checkpoint: {theirs})\n"
                        f"{swarm_story(swarm.peers)}")  # fmt: skip
        if stage == "rm":
            assert after[figure] >= 0.6, after  # clearly above chance (0.5), not only above a fresh head
    else:
        assert after[figure] < 0.8 * before[figure], (before, after)
    if stage in ("grpo", "ppo"):
        assert after["kl"] < 1.0, after  # the KL penalty keeps the policy near the SFT model
