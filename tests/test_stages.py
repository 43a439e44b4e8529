"""The RLHF stages' plumbing, in-process and fast: data columns, collation, losses wired to the right tensors,
gradients reaching the trained weights, checkpoints that chain, and metrics. The swarm runs that show each stage
improving its held-out figure are in ``tests/test_stages_swarm.py``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from prometheus_client import generate_latest

from potluck.peer.training.checkpoint import save_checkpoint
from potluck.peer.training.data import DatasetFormatError, PeerDataStream, load_rows
from potluck.peer.training.metrics import PeerMetrics
from potluck.peer.training.stages import make_stage, stage_context
from potluck.peer.training.stages.data import check_stage_data, encode_prompt, stage_data
from potluck.peer.training.stages.evaluation import answer_probability, evaluate_stage, reward_model_accuracy
from potluck.peer.training.stages.losses import pairwise_reward_loss, ppo_clip_fraction
from potluck.peer.training.stages.models import VALUE_HEAD_FILE, WeightsNotFoundError, load_frozen_causal_lm
from potluck.peer.training.stages.rollout import RewardModelScorer, mask_after_eos
from potluck.protocols.runspec import load_run_spec

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def data_files(tiny_assets) -> dict[str, str]:
    folder = tiny_assets["train"].parent
    return {
        "sft": (str(tiny_assets["train"]), str(tiny_assets["eval"])),
        "preferences": (str(folder / "preferences_train.jsonl"), str(folder / "preferences_eval.jsonl")),
        "prompts": (str(folder / "prompts_train.jsonl"), str(folder / "prompts_eval.jsonl")),
    }


STAGE_DATA = {"sft": "sft", "distill": "sft", "rm": "preferences", "dpo": "preferences", "grpo": "prompts",
              "ppo": "prompts"}  # fmt: skip


@pytest.fixture
def stage_spec(make_spec, tiny_assets):
    """A loaded spec of ``stage`` on its bundled data, small batches."""

    def build(stage: str, **overrides):
        train, held_out = data_files(tiny_assets)[STAGE_DATA[stage]]
        extra = {"teacher": {"path": str(tiny_assets["model"])}} if stage == "distill" else {}
        settings = {"stage": stage, "data": {"path": train, "eval_path": held_out}, **extra,
                    "batch": {"target_batch_size": 8, "per_peer_batch_size": 8},
                    "rl": {"group_size": 4, "max_new_tokens": 4}}  # fmt: skip
        settings.update(overrides)
        return load_run_spec(make_spec(**settings))

    return build


def first_batches(spec, context, count: int) -> list[dict]:
    stream = PeerDataStream(spec.data, context.tokenizer, spec.batch.per_peer_batch_size,
                            stage_data(spec, context.tokenizer))  # fmt: skip
    batches = stream.batches(0)
    return [next(batches) for _ in range(count)]


def first_batch(spec, context):
    return first_batches(spec, context, 1)[0]


def built(spec):
    context = stage_context(spec, CPU, None)
    stage = make_stage(spec.stage, context)
    torch.manual_seed(0)
    return context, stage, stage.build_model()


def fit(stage, model, batch, steps: int, lr: float) -> float:
    """Train ``model`` on one batch with Adam for ``steps``; the stage's loss on it afterwards."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        stage.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return stage.loss(model, batch).item()


# ------------------------------------------------------------------------------------ data columns (acceptance 6)


@pytest.mark.parametrize(
    ("stage", "data", "missing", "expected"),
    [
        ("rm", "sft", "['chosen', 'rejected']", "preference pairs: prompt, chosen, rejected"),
        ("dpo", "prompts", "['chosen', 'rejected']", "preference pairs: prompt, chosen, rejected"),
        ("grpo", "sft", "['answer']", "prompt-only: prompt, plus answer"),
        ("ppo", "preferences", "['answer']", "prompt-only: prompt, plus answer"),
    ],
)
def test_data_without_the_stage_columns_fails_naming_them(
    stage_spec, tiny_assets, stage, data, missing, expected
):
    train, held_out = data_files(tiny_assets)[data]
    spec = stage_spec(stage, data={"path": train, "eval_path": held_out})
    with pytest.raises(DatasetFormatError) as caught:
        check_stage_data(spec)
    message = str(caught.value)
    assert f"missing column(s) {missing}" in message
    assert f"stage {stage!r}" in message and expected in message and "data.path" in message


def test_distill_data_must_be_a_language_modeling_format(stage_spec, tiny_assets):
    train, _ = data_files(tiny_assets)["prompts"]
    with pytest.raises(
        DatasetFormatError, match="does not fit stage 'distill'.*prompt/completion, messages or text"
    ):
        check_stage_data(stage_spec("distill", data={"path": train, "eval_path": None}))


def test_held_out_data_is_checked_too(stage_spec, tiny_assets):
    train, _ = data_files(tiny_assets)["preferences"]
    spec = stage_spec("dpo", data={"path": train, "eval_path": str(tiny_assets["eval"])})
    with pytest.raises(DatasetFormatError, match="data.eval_path"):
        check_stage_data(spec)


@pytest.mark.integration  # starts a process
def test_run_peer_refuses_bad_columns_before_starting(stage_spec, tiny_assets, tmp_path):
    """The CLI path: exit code 2 and one line naming the columns, before any model or DHT is started."""
    train, held_out = data_files(tiny_assets)["sft"]
    spec = stage_spec("grpo", data={"path": train, "eval_path": held_out})
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(json.dumps(spec.model_dump(mode="json")))
    run = subprocess.run([sys.executable, "-m", "potluck.peer.cli", "--run-spec", str(spec_path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert "missing column(s) ['answer']" in run.stderr
    assert "peer " not in run.stderr  # no DHT was started


# --------------------------------------------------------------------------------------------------- stages


def test_reward_model_loss_is_bradley_terry_on_chosen_vs_rejected(stage_spec):
    spec = stage_spec("rm")
    context, stage, model = built(spec)
    batch = first_batch(spec, context)
    assert stage.batch_size(batch) == 8 and batch["input_ids"].shape[0] == 16
    loss = stage.loss(model, batch)
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert torch.allclose(loss, pairwise_reward_loss(scores[:8], scores[8:]), atol=1e-6)
    assert 0.0 <= stage.last_metrics["pairwise_accuracy"] <= 1.0
    loss.backward()
    assert model.score.weight.grad.abs().sum() > 0


@pytest.mark.usefixtures("one_torch_thread")
def test_reward_model_on_an_encoder_with_its_own_tokenizer(stage_spec, tiny_encoder, tmp_path):
    """A BERT-style backbone (no EOS; transformers scores it at the pooled [CLS]) with its own WordPiece tokenizer
    trains as the rm stage, checkpoints, evaluates, and scores a policy's text as PPO does (re-tokenised)."""
    spec = stage_spec("rm", model={"name_or_path": str(tiny_encoder)})
    context, stage, model = built(spec)
    assert type(model).__name__ == "BertForSequenceClassification"
    batch = first_batch(spec, context)
    rows = torch.arange(batch["input_ids"].shape[0])
    last = batch["attention_mask"].sum(-1) - 1
    assert (batch["input_ids"][:, 0] == context.tokenizer.cls_token_id).all()
    assert (batch["input_ids"][rows, last] == context.tokenizer.sep_token_id).all()

    first = stage.loss(model, batch).item()
    assert fit(stage, model, batch, steps=8, lr=1e-2) < 0.5 * first

    checkpoint = save_checkpoint(tmp_path, spec.run_id, 8, model, context.tokenizer, {}, keep=0)
    model.eval()
    held_out = load_rows(spec.data.eval_path)
    with torch.no_grad():
        expected = reward_model_accuracy(model, context.tokenizer, spec, held_out)
    assert evaluate_stage(spec, str(checkpoint.path)) == {"pairwise_accuracy": pytest.approx(expected)}
    # PPO's scorer, given text: the same scores as the trained model on the rm stage's batch, for rows padded
    # to another width
    pairs = load_rows(spec.data.path)[:3]
    scorer = RewardModelScorer(str(checkpoint.path), CPU)
    scores = scorer([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    stage_rows = stage_data(spec, context.tokenizer)
    chosen = stage_rows.collate([stage_rows.encode(p) for p in pairs])
    with torch.no_grad():
        trained = model(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"]).logits[:3, 0]
    assert torch.allclose(scores, trained, atol=1e-5)


def test_dpo_starts_at_log2_and_learns_the_preferences(stage_spec):
    spec = stage_spec("dpo", dpo={"beta": 0.5})
    context, stage, model = built(spec)
    batch = first_batch(spec, context)
    assert math.isclose(stage.loss(model, batch).item(), math.log(2), abs_tol=1e-5)  # policy == reference
    assert fit(stage, model, batch, steps=8, lr=3e-3) < math.log(2) - 0.1
    assert stage.last_metrics["preference_accuracy"] > 0.5
    assert all(not p.requires_grad for p in stage.reference.parameters())


@pytest.mark.parametrize("stage_name", ["grpo", "ppo"])
def test_rl_stage_rolls_out_scores_and_sends_gradients(stage_spec, stage_name):
    spec = stage_spec(stage_name)
    context, stage, model = built(spec)
    batch = first_batch(spec, context)
    assert stage.batch_size(batch) == 8 and len(batch["answers"]) == 8
    # the untrained model never answers right, so every reward (and advantage) would be 0: reward length instead
    stage.reward = lambda prompts, completions, answers: torch.tensor([float(len(c)) for c in completions])
    loss = stage.loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    metrics = stage.last_metrics
    for name in (
        "reward_mean",
        "reward_std",
        "kl",
        "policy_loss",
        "rollout_tokens_per_second",
        "clip_fraction",
    ):
        assert name in metrics
    if stage_name == "ppo":
        assert "value_loss" in metrics and model.value_head.weight.grad.abs().sum() > 0


def reward_length(prompts, completions, answers):
    return torch.tensor([float(len(c)) for c in completions])


@pytest.mark.parametrize("stage_name", ["grpo", "ppo"])
def test_rollouts_are_reused_and_clipping_acts_after_an_optimizer_step(stage_spec, stage_name):
    """``rl.updates_per_rollout = 2``: the second local step trains on the first step's rollouts (whatever batch
    the trainer passes), against the log-probs of the policy that sampled them, so after an update the ratio moves
    off 1 and a small clip range clips; the third step samples afresh."""
    spec = stage_spec(stage_name, rl={"group_size": 4, "max_new_tokens": 4, "updates_per_rollout": 2,
                                      "clip_range": 0.01})  # fmt: skip
    context, stage, model = built(spec)
    stage.reward = reward_length
    batches = first_batches(spec, context, 3)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step(batch):
        loss = stage.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return stage.buffer.rollouts, dict(stage.last_metrics)

    rollouts, metrics = step(batches[0])
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["clip_fraction"] == 0.0
    assert metrics["generation_seconds"] > 0
    sequences = rollouts.sequences.clone()

    reused, metrics = step(batches[1])
    assert reused is rollouts and torch.equal(reused.sequences, sequences)
    assert abs(metrics["ratio_mean"] - 1.0) > 1e-3
    assert 0.0 < metrics["clip_fraction"] <= 1.0
    assert metrics["generation_seconds"] == 0.0  # no generation this step

    fresh, metrics = step(batches[2])
    assert fresh is not rollouts and metrics["generation_seconds"] > 0
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["clip_fraction"] == 0.0


def test_one_update_per_rollout_samples_every_step(stage_spec):
    spec = stage_spec("grpo")
    assert spec.rl.updates_per_rollout == 1
    context, stage, model = built(spec)
    stage.reward = reward_length
    seen = []
    for batch in first_batches(spec, context, 2):
        stage.loss(model, batch).backward()
        seen.append(stage.buffer.rollouts)
        assert stage.last_metrics["clip_fraction"] == 0.0 and stage.last_metrics["generation_seconds"] > 0
    assert seen[0] is not seen[1]


def test_clip_fraction_counts_the_tokens_whose_clipped_term_wins():
    ratio = torch.tensor([[1.5, 0.5, 1.05, 0.5]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    # 1.5 with A > 0 and 0.5 with A < 0 are clipped; 0.5 with A > 0 is not (the min keeps it); 1.05 is in range
    args = (torch.log(ratio), torch.zeros_like(ratio), advantages)
    assert ppo_clip_fraction(*args, torch.ones_like(ratio), 0.2).item() == pytest.approx(0.5)
    assert ppo_clip_fraction(*args, torch.tensor([[1, 1, 1, 0]]), 0.2).item() == pytest.approx(1 / 3)
    assert ppo_clip_fraction(torch.zeros_like(ratio), *args[1:], torch.ones_like(ratio), 0.01).item() == 0.0


def test_completion_mask_stops_after_the_first_eos():
    eos = 2
    ids = torch.tensor([[5, 6, eos, 0, 0], [5, 5, 5, 5, 5], [eos, 7, eos, 0, 0]])
    assert mask_after_eos(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    # any of several stop tokens (Gemma's turns end in <end_of_turn>, 7 here, and its EOS stops too)
    assert mask_after_eos(ids, [eos, 7]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert mask_after_eos(ids[2:, 1:], [eos, 7]).tolist() == [[1, 0, 0, 0]]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_answer_probability_is_the_sampling_probability_of_the_answer(stage_spec, tiny_assets, temperature):
    """The expected exact_answer reward, computed over left-padded batches of prompts of several lengths,
    equals each prompt's own product of next-token probabilities (at the rollouts' temperature) along the
    answer's tokens and EOS."""
    from transformers import AutoTokenizer

    spec = stage_spec("grpo", rl={"group_size": 4, "max_new_tokens": 4, "temperature": temperature})
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_assets["model"]))
    policy = load_frozen_causal_lm(str(tiny_assets["model"]), CPU)
    with open(spec.data.eval_path) as f:
        rows = [json.loads(line) for line in f][::40][:6]
    assert len({len(r["prompt"]) for r in rows}) > 1  # left padding is exercised
    expected = []
    for row in rows:
        answer = tokenizer(row["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        prompt = encode_prompt(row["prompt"], tokenizer)
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        log_p = torch.log_softmax(logits.float() / temperature, -1).gather(-1, torch.tensor(answer)[:, None])
        expected.append(float(log_p.sum().exp()))
    assert answer_probability(policy, tokenizer, spec, rows) == pytest.approx(
        sum(expected) / len(rows), rel=1e-4
    )


def test_distill_lowers_the_kl_to_the_teacher(stage_spec, tmp_path):
    teacher_dir = tmp_path / "teacher"
    spec = stage_spec("sft")
    context, _, teacher = built(spec)
    torch.manual_seed(1)
    for p in teacher.parameters():  # a teacher that differs from the student
        p.data.add_(0.2 * torch.randn_like(p))
    teacher.save_pretrained(teacher_dir)
    context.tokenizer.save_pretrained(teacher_dir)
    spec = stage_spec("distill", teacher={"path": str(teacher_dir), "temperature": 1.0})
    context, stage, model = built(spec)
    batch = first_batch(spec, context)
    first = stage.loss(model, batch).item()
    assert fit(stage, model, batch, steps=6, lr=3e-3) < 0.7 * first


def test_ppo_checkpoint_is_a_causal_lm_and_resumes_its_value_head(stage_spec, tmp_path):
    spec = stage_spec("ppo")
    context, stage, model = built(spec)
    torch.nn.init.constant_(model.value_head.weight, 0.5)
    checkpoint = save_checkpoint(tmp_path, spec.run_id, 3, model, context.tokenizer, {}, keep=0)
    assert (checkpoint.path / VALUE_HEAD_FILE).is_file()
    load_frozen_causal_lm(str(checkpoint.path), CPU)  # what chat, evaluation and the next stage load
    resumed = stage.build_model(weights_from=str(checkpoint.path))
    assert torch.equal(resumed.value_head.weight, model.value_head.weight)


def test_init_from_finds_a_run_in_the_save_dir_and_names_a_missing_one(stage_spec, tmp_path):
    spec = stage_spec("sft")
    context, _, model = built(spec)
    save_checkpoint(tmp_path, "sft-run", 5, model, context.tokenizer, {}, keep=0)
    newest = save_checkpoint(tmp_path, "sft-run", 9, model, context.tokenizer, {}, keep=0)
    assert stage_context(
        stage_spec("dpo", init_from="sft-run"), CPU, tmp_path
    ).start_model.name_or_path == str(newest.path)
    with pytest.raises(WeightsNotFoundError, match="init_from: 'no-such-run'"):
        stage_context(stage_spec("dpo", init_from="no-such-run"), CPU, tmp_path)


def test_stage_metrics_are_exported():
    metrics = PeerMetrics("run-x")
    metrics.stage_step({"reward_mean": 0.25, "kl": 0.01, "generation_seconds": 0.5, "clip_fraction": 0.125},
                       step_seconds=2.0)  # fmt: skip
    text = generate_latest(metrics.registry).decode()
    assert 'potluck_clip_fraction{run_id="run-x"} 0.125' in text
    assert 'potluck_reward_mean{run_id="run-x"} 0.25' in text
    assert 'potluck_generation_time_share{run_id="run-x"} 0.25' in text
