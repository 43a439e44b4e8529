"""Model families beyond the bundled Llama (issue 18): Qwen2, Qwen3, Mistral and Gemma 3, each a tiny random model
with a tokenizer and chat template of its family's shape (``tools/tiny/families.py``), trained on the tiny task as
conversations, through that template.

For each family: its conversations laid out exactly as its template renders them (one BOS or none, one end of turn),
a DPO and a GRPO step in this process, and a LoRA SFT run of two real peers (loss falls, adapters bit-equal). A
model that no stage or adapter can train is refused up front (``tests/test_input_errors.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from potluck.peer.training.data import IGNORE_INDEX, PeerDataStream, tokenize_example
from potluck.peer.training.model import stop_token_ids
from potluck.peer.training.stages import make_stage, stage_context
from potluck.peer.training.stages.data import stage_data
from potluck.protocols.runspec import load_run_spec
from potluck.tools.tiny.assets import as_conversation
from potluck.tools.tiny.families import FAMILIES
from tests.helpers import checkpoint_of, finished_pairs, global_step_losses, start_pairs

TRAINED = ["qwen2", "qwen3", "mistral", "gemma3"]
"""The families besides Llama, whose every other test covers it."""

CHAT_RUN = {"adapter": {"kind": "lora", "r": 8}, "data": {"max_length": 32}}
"""The tiny task as conversations is longer than as text: Qwen's layout of ``12+34=`` and its answer is 28 tokens."""


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", *TRAINED])
@pytest.mark.parametrize("conversational", [True, False], ids=["conversation", "text"])
def test_rows_are_laid_out_as_the_family_lays_them_out(family, conversational, family_model):
    """A conversation is exactly what the family's template renders, nothing added (one BOS from Mistral's and
    Gemma's templates, none from Qwen's or the bundled Llama's); text gets the tokenizer's one BOS (none for Qwen) and
    EOS. Either way the trained tokens end with one end of turn, where generation stops."""
    folder = family_model(family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    shape = FAMILIES[family]
    row = {"prompt": "12+34=", "completion": "46"}
    example = tokenize_example(
        as_conversation(row) if conversational else row, "prompt_completion", tokenizer, 64
    )
    text = tokenizer.decode(example.input_ids)
    if conversational:
        turns = as_conversation(row)
        assert text == tokenizer.apply_chat_template(turns["prompt"] + turns["completion"], tokenize=False)
    renders_bos = shape.bos is not None and (not conversational or "bos_token" in shape.chat_template)
    bos = [tokenizer.bos_token_id] if renders_bos else []
    assert example.input_ids[: len(bos)] == bos and example.input_ids.count(tokenizer.bos_token_id) == len(
        bos
    ), text
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained, skip_special_tokens=True).strip() == "46", text
    turn_end = shape.turn_end if conversational and shape.turn_end else shape.eos
    end_id = tokenizer.convert_tokens_to_ids(turn_end)
    assert (
        trained.count(end_id) == 1 and tokenizer.eos_token_id not in trained[trained.index(end_id) + 1 :]
    ), text
    assert end_id in stop_token_ids(AutoModelForCausalLM.from_pretrained(folder), tokenizer)


def stage_spec(make_spec, folder, stage: str, data: dict, **overrides):
    run = {**CHAT_RUN, "data": {**CHAT_RUN["data"], "path": str(data), "eval_path": None}, **overrides}
    return load_run_spec(make_spec(model={"name_or_path": str(folder)}, stage=stage, **run,
                                   batch={"target_batch_size": 8, "per_peer_batch_size": 8}))  # fmt: skip


def first_batch_of(spec):
    context = stage_context(spec, torch.device("cpu"), None)
    stage = make_stage(spec.stage, context)
    torch.manual_seed(0)
    model = stage.build_model()
    stream = PeerDataStream(spec.data, context.tokenizer, 8, stage_data(spec, context.tokenizer))
    return stage, model, next(stream.batches(0))


def lora_step(stage, model, batch) -> float:
    """One Adam step on the LoRA weights; the loss before it. The gradient reaches every LoRA tensor's B matrix
    (A's gradient is zero while B is still zero, as peft initialises it)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    loss = stage.loss(model, batch)
    loss.backward()
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


@pytest.mark.unit
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("family", TRAINED)
def test_dpo_and_grpo_take_a_step_on_the_family(family, family_model, chat_data, make_spec):
    folder = family_model(family)
    dpo = stage_spec(make_spec, folder, "dpo", chat_data["preferences_train"])
    stage, model, batch = first_batch_of(dpo)
    assert math.isclose(lora_step(stage, model, batch), math.log(2), abs_tol=1e-5)  # policy == reference
    assert stage.loss(model, batch).item() < math.log(2)

    grpo = stage_spec(
        make_spec, folder, "grpo", chat_data["prompts_train"], rl={"group_size": 4, "max_new_tokens": 4}
    )
    stage, model, batch = first_batch_of(grpo)
    # the untrained model never answers right, so every reward (and advantage) would be 0: reward length instead
    stage.reward = lambda prompts, completions, answers: torch.tensor([float(len(c)) for c in completions])
    assert math.isfinite(lora_step(stage, model, batch))
    assert stage.last_metrics["reward_std"] > 0 and stage.last_metrics["ratio_mean"] == pytest.approx(1.0)


@pytest.mark.unit
@pytest.mark.usefixtures("one_torch_thread")
def test_a_reward_model_trains_on_a_family_without_a_pad_token(family_model, chat_data, make_spec):
    """Mistral's tokenizer has no pad token: the batch is padded with EOS (``load_tokenizer``), and the score head
    finds each row's last token by that id (transformers refused a padded batch without one)."""
    spec = stage_spec(
        make_spec, family_model("mistral"), "rm", chat_data["preferences_train"], adapter={"kind": "none"}
    )
    stage, model, batch = first_batch_of(spec)
    assert AutoTokenizer.from_pretrained(family_model("mistral")).pad_token is None
    loss = stage.loss(model, batch)
    loss.backward()
    assert model.score.weight.grad.abs().sum() > 0 and math.isfinite(loss.item())
    assert model.config.pad_token_id == stage.context.tokenizer.eos_token_id


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_two_peers_train_a_lora_adapter_of_each_family(
    family_model, chat_data, make_spec, local_swarm, tmp_path
):
    """One pair of real peers per family, all pairs at once (each its own run)."""
    steps = 5
    data = {**CHAT_RUN["data"], "path": str(chat_data["train"]), "eval_path": None}
    runs = {
        family: {"model": {"name_or_path": str(family_model(family))}, "adapter": CHAT_RUN["adapter"], "data": data,
                 "optimizer": {"lr": 0.02}, "batch": {"target_batch_size": 64, "per_peer_batch_size": 32},
                 "max_global_steps": steps}
        for family in TRAINED
    }  # fmt: skip
    for family, a, b in finished_pairs(start_pairs(local_swarm, make_spec, tmp_path, runs)):
        # the swarm's loss at each global step, over both peers' batches (in-process, 4 steps of 64 rows at this
        # learning rate took it to 0.80-0.87 of the first step's in every family)
        losses = global_step_losses((a, b))
        assert len(losses) == steps and losses[-1] < 0.9 * losses[0], (family, losses)
        assert a.summary().rounds.succeeded >= 1, (family, a.summary())
        adapters = [
            load_file(checkpoint_of(tmp_path / family / name, steps) / "adapter_model.safetensors")
            for name in "ab"
        ]
        assert adapters[0].keys() == adapters[1].keys() and adapters[0]
        assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0]), family
