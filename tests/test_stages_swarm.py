"""Each RLHF stage, run by a real 2-peer swarm (separate processes, hivemind DHT and averaging on loopback),
improves its held-out figure from an SFT warm start (acceptance 1-3 of issue 4).

The warm starts are trained once per module, in-process, by the same stage code (``train_in_process``): they are
inputs here, not what is under test. Measured margins, and the commands that produce them, are in
docs/benchmarks.md ("RLHF stages").

- ``sft``: 400 steps of 256 examples, about 95 % held-out exact-match. The reward model starts from it: a reward
  model can only judge sums as well as its starting model computes them (from a 60-step SFT it stayed near 0.6
  pairwise accuracy).
- ``sft_rl``: the same run after 250 of those steps, about 42 % exact-match (expected reward 0.32), the start of
  GRPO and PPO: RL with the 0/1 ``exact_answer`` reward needs a policy that is sometimes right, and room to
  improve (from the 95 % model PPO gained +0.008 in a CI run, below the asserted +0.01). The accuracy climbs
  steeply between 200 and 300 steps (0.17, 0.42, 0.86 at 200, 250, 300); training is seeded, so each run (and
  each machine) gets the same model.
- ``sft_short``: 60 steps of 64 (about 3 %), the start of DPO. The strong SFT already prefers the right sum in
  0.91 of the held-out pairs, and its remaining errors (units digits) are ones it cannot yet tell apart; DPO's
  short run has little to move there (0.907 -> 0.907 in a swarm run), while from the short SFT it has a clear
  signal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from potluck.peer.training.checkpoint import latest_checkpoint
from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.stages import make_stage, stage_context
from potluck.peer.training.stages.data import stage_data
from potluck.peer.training.stages.evaluation import evaluate_stage
from potluck.protocols.runspec import RunSpec, load_run_spec
from tests.helpers import start_first

# generous: the module fixture trains two models, and 2-core CI machines are often shared
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SFT_STEPS, RL_START_STEPS, SFT_BATCH, SHORT_SFT_STEPS = 400, 250, 256, 60


def train_in_process(spec: RunSpec, saves: dict[int, Path], batch_size: int, lr: float) -> dict[int, str]:
    """Train ``spec``'s stage with plain AdamW in this process; after step ``n`` save the model to ``saves[n]``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # like each peer (OMP_NUM_THREADS=1): tiny ops spin-wait badly on a shared machine
    try:
        return _train(spec, saves, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(spec: RunSpec, saves: dict[int, Path], batch_size: int, lr: float) -> dict[int, str]:
    torch.manual_seed(spec.seed)
    context = stage_context(spec, torch.device("cpu"), None)
    stage = make_stage(spec.stage, context)
    model = stage.build_model()
    batches = PeerDataStream(
        spec.data, context.tokenizer, batch_size, stage_data(spec, context.tokenizer)
    ).batches(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    for step in range(1, max(saves) + 1):
        stage.loss(model, next(batches)).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step in saves:
            model.save_pretrained(saves[step])
            context.tokenizer.save_pretrained(saves[step])
    return {step: str(out) for step, out in saves.items()}


@pytest.fixture(scope="module")
def warm_start(tiny_assets, tmp_path_factory) -> dict[str, str]:
    """Two SFT runs of the tiny model (module docstring): ``sft`` (~95 % exact-match) with ``sft_rl`` (~42 %) on the
    way, and ``sft_short`` (~3 %)."""
    root = tmp_path_factory.mktemp("warm")
    base = {"run_id": "warm", "model": {"name_or_path": str(tiny_assets["model"])},
            "batch": {"target_batch_size": 8, "per_peer_batch_size": 8}}  # fmt: skip
    sft = RunSpec.model_validate({**base, "data": {"path": str(tiny_assets["train"]), "max_length": 16}})
    long = train_in_process(
        sft, {RL_START_STEPS: root / "sft_rl", SFT_STEPS: root / "sft"}, SFT_BATCH, lr=3e-3
    )
    short = train_in_process(sft, {SHORT_SFT_STEPS: root / "sft_short"}, batch_size=64, lr=3e-3)
    return {"sft": long[SFT_STEPS], "sft_rl": long[RL_START_STEPS], "sft_short": short[SHORT_SFT_STEPS]}


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
                  "batch": small, "max_global_steps": 30}, "answer_probability", "up"),
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
        # must widen by at least 0.2. From ``sft_rl`` GRPO raised the expected reward (answer_probability) by
        # +0.112..+0.113 and PPO by +0.147..+0.159 in 3 runs each (from ``sft``, at 0.895, PPO gained +0.008 in a
        # CI run); greedy exact-match rose 0.42 -> 0.66..0.72, but moves only when an argmax flips: not asserted.
        # The reward model ended at 0.714 in one run and at 0.629 (from a fresh head's 0.532) in a suite run: the
        # peers' data orders are seeded by their peer ids, new every run, and the rounds' timing varies. It
        # must gain clearly (+0.05) and end clearly above chance (0.6).
        margin = {"rm": 0.05, "dpo": 0.2, "grpo": 0.05, "ppo": 0.05}[stage]
        assert after[figure] > before[figure] + margin, (before, after)
        if stage == "rm":
            assert after[figure] >= 0.6, after  # clearly above chance (0.5), not only above a fresh head
    else:
        assert after[figure] < 0.8 * before[figure], (before, after)
    if stage in ("grpo", "ppo"):
        assert after["kl"] < 1.0, after  # the KL penalty keeps the policy near the SFT model
