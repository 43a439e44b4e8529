"""The run's model loads through from_pretrained; every adapter kind trains only its own tensors, and trains,
checkpoints, resumes, evaluates and generates end to end."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from potluck.peer.training.checkpoint import save_checkpoint
from potluck.peer.training.data import PeerDataStream, collate, load_rows, tokenize_example
from potluck.peer.training.exact_match import evaluate_spec, held_out_loss
from potluck.peer.training.model import (
    PROMPT_ENCODER_FILE,
    build_model,
    load_tokenizer,
    save_weights,
    trainable_parameters,
)
from potluck.peer.training.stages.data import encode_prompt
from potluck.peer.training.stages.models import load_frozen_causal_lm, load_reward_model
from potluck.protocols.runspec import parse_run_spec
from potluck.tools.chat import Chat

pytestmark = pytest.mark.unit

ADAPTERS = [
    {"kind": "none"},
    {"kind": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    {"kind": "ia3"},
    {"kind": "prefix", "num_virtual_tokens": 4},
    {"kind": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 32},
    {"kind": "prompt_tuning", "num_virtual_tokens": 4},
]
PEFT_METHODS = ADAPTERS[1:]
PROMPT_LEARNING = ("prefix", "p_tuning", "prompt_tuning")


def spec_for(tiny_assets, adapter):
    return parse_run_spec(
        {
            "run_id": "t",
            "model": {"name_or_path": str(tiny_assets["model"])},
            "adapter": adapter,
            "data": {
                "path": str(tiny_assets["train"]),
                "eval_path": str(tiny_assets["eval"]),
                "max_length": 16,
            },
            "batch": {"target_batch_size": 4, "per_peer_batch_size": 4},
        }
    )


@pytest.mark.parametrize("adapter", ADAPTERS, ids=[a["kind"] for a in ADAPTERS])
def test_adapter_trains_only_its_parameters(tiny_assets, adapter):
    spec = spec_for(tiny_assets, adapter)
    tokenizer = load_tokenizer(spec.model)
    model = build_model(spec, torch.device("cpu"))
    trainable = trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    if adapter["kind"] == "none":
        assert n_trainable == total
    else:
        assert 0 < n_trainable < total / 2

    ids = tokenizer(["1+2=3", "4+5=9"], return_tensors="pt", add_special_tokens=False).input_ids
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_no_loaded_model_swaps_its_layers_for_kernels_from_the_hub(tiny_assets, tmp_path):
    """transformers 5 replaces layers with kernels it downloads from the hub once a model runs on CUDA, unless
    told not to: on an H200 that crashed every ``run-peer --gpu 0`` at start (the publisher's trust could not be
    verified). Every way a peer loads a model turns it off (``use_kernels`` is what that switch sets)."""
    cpu = torch.device("cpu")
    trained = build_model(spec_for(tiny_assets, ADAPTERS[1]), cpu)
    save_weights(trained, tmp_path / "adapter")
    loaded = {
        "trained": trained.get_base_model(),
        "full": build_model(spec_for(tiny_assets, ADAPTERS[0]), cpu),
        "frozen": load_frozen_causal_lm(str(tiny_assets["model"]), cpu),
        "frozen adapter": load_frozen_causal_lm(str(tmp_path / "adapter"), cpu),
        "reward": load_reward_model(str(tiny_assets["model"]), cpu, seed=0),
    }
    assert {name: model.use_kernels for name, model in loaded.items()} == dict.fromkeys(loaded, False)


@pytest.mark.parametrize("adapter", ADAPTERS[1:3], ids=["lora", "prefix"])
def test_adapter_init_is_identical_on_every_peer(tiny_assets, adapter):
    spec = spec_for(tiny_assets, adapter)
    first = [p.detach().clone() for p in trainable_parameters(build_model(spec, torch.device("cpu")))]
    torch.manual_seed(1234)  # whatever a peer did before must not matter
    second = trainable_parameters(build_model(spec, torch.device("cpu")))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=False))


def test_checkpointed_adapter_round_trips(tiny_assets, tmp_path):
    spec = spec_for(tiny_assets, ADAPTERS[1])
    model = build_model(spec, torch.device("cpu"))
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.5)
    model.save_pretrained(tmp_path)
    restored = build_model(spec, torch.device("cpu"), weights_from=str(tmp_path))
    assert all(
        torch.equal(a, b)
        for a, b in zip(trainable_parameters(model), trainable_parameters(restored), strict=False)
    )
    assert trainable_parameters(restored)[0].requires_grad


def greedy_by_forward(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by one full forward pass per token, reading the logits at the last input position: what
    ``generate`` must agree with when the model's outputs line up with its inputs. The new tokens and their logits."""
    ids, logits = list(prompt_ids), []
    for _ in range(max_new_tokens):
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        logits.append(out.logits[0, -1])
        ids.append(int(logits[-1].argmax()))
    return ids[len(prompt_ids) :], torch.stack(logits)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("adapter", PEFT_METHODS, ids=[a["kind"] for a in PEFT_METHODS])
def test_peft_method_trains_checkpoints_resumes_evaluates_and_generates(tiny_assets, tmp_path, adapter):
    spec = spec_for(tiny_assets, adapter)
    tokenizer = load_tokenizer(spec.model)
    model = build_model(spec, torch.device("cpu"))
    batches = PeerDataStream(spec.data, tokenizer, 64).batches(0)
    held_out = collate([tokenize_example(r, "prompt_completion", tokenizer, 16)
                        for r in load_rows(spec.data.eval_path)], tokenizer.pad_token_id)  # fmt: skip

    # trains: the held-out loss falls
    with torch.no_grad():
        before = model(**held_out).loss.item()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    for _ in range(15):
        model(**next(batches)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        trained = model(**held_out).loss.item()
    assert trained < before - 0.05, (before, trained)

    # checkpoints what resuming needs: a prompt learner's whole prompt encoder (P-tuning's MLP too)
    checkpoint = save_checkpoint(tmp_path, spec.run_id, 15, model, tokenizer, {}, keep=0)
    if adapter["kind"] in PROMPT_LEARNING:
        saved = load_file(checkpoint.path / PROMPT_ENCODER_FILE)
        assert "embedding.weight" in saved
        assert any(name.startswith("mlp_head.") for name in saved) == (adapter["kind"] == "p_tuning")

    # resumes: the same trainable tensors, in the same order (the swarm's optimizer state is kept by position)
    resumed = build_model(spec, torch.device("cpu"), weights_from=str(checkpoint.path))
    params, resumed_params = trainable_parameters(model), trainable_parameters(resumed)
    assert [p.shape for p in params] == [p.shape for p in resumed_params]
    assert all(torch.equal(a, b) and b.requires_grad for a, b in zip(params, resumed_params, strict=True))
    with torch.no_grad():
        assert resumed(**held_out).loss.item() == pytest.approx(trained, abs=1e-5)

    # evaluates: logits lined up with the labels (virtual tokens dropped) give peft's own loss, which it
    # computes with labels padded for them
    result = evaluate_spec(spec, checkpoint.path)
    assert result.examples == held_out["input_ids"].shape[0]
    assert result.loss == pytest.approx(trained, abs=1e-4)

    # generates: from the checkpoint, as potluck chat loads it, the same logits as forward passes of the trained
    # model (peft's generate ignored the virtual tokens under transformers 5: peer/training/model.py)
    model.eval()
    chat = Chat(checkpoint.path, max_new_tokens=4)
    for prompt in ("12+30=", "7+8="):
        prompt_ids = encode_prompt(prompt, tokenizer)
        with torch.no_grad():
            expected_ids, expected_logits = greedy_by_forward(model, prompt_ids, 4)
            generated = chat.model.generate(
                input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        assert generated.sequences[0, len(prompt_ids) :].tolist() == expected_ids
        assert torch.allclose(torch.cat(generated.logits), expected_logits, atol=1e-4)
        eos = tokenizer.eos_token_id
        answer = expected_ids[: expected_ids.index(eos)] if eos in expected_ids else expected_ids
        assert chat.answer(prompt) == tokenizer.decode(answer, skip_special_tokens=True)


def test_held_out_loss_is_the_mean_loss_per_completion_token_over_every_batch(tiny_assets):
    spec = spec_for(tiny_assets, {"kind": "none"})
    tokenizer = load_tokenizer(spec.model)
    model = build_model(spec, torch.device("cpu"))
    rows = load_rows(spec.data.eval_path)
    held_out = collate(
        [tokenize_example(r, "prompt_completion", tokenizer, 16) for r in rows], tokenizer.pad_token_id
    )
    with torch.no_grad():
        expected = model(**held_out).loss.item()  # transformers' mean over every labelled token at once
    # in batches of 100: three of other widths and sizes, each weighted by its completion tokens
    loss = held_out_loss(model, tokenizer, spec.data.eval_path, max_length=16, limit=None, batch_size=100)
    assert len(rows) > 200 and loss == pytest.approx(expected, rel=1e-5)
