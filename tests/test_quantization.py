"""``model.quantization``: a trainer's base model and a shard server's span hold their linear weights in 8 or 4 bits
(bitsandbytes' CPU backend here; the same code runs on CUDA), and train full-precision adapters of the same names and
shapes as an unquantised peer's, so the two can average them (two real peers: tests/test_swarm.py)."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from potluck.peer.quantization import held_bytes, quantize_linears
from potluck.peer.shard.blocks import load_block_span
from potluck.peer.shard.server.adapters import SpanAdapter
from potluck.peer.training.model import (
    build_model,
    load_base_model,
    load_tokenizer,
    save_weights,
    trainable_parameters,
)
from potluck.protocols.runspec import parse_run_spec
from tests.helpers import checkpoint_of, start_first

bnb = pytest.importorskip("bitsandbytes", reason="model.quantization needs the quant extra (bitsandbytes)")
pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

KINDS = ["4bit", "8bit"]
LORA = {"kind": "lora", "r": 4, "target_modules": "all-linear"}
QUANTIZED_LINEAR = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}


def spec_for(tiny_assets, quantization: str | dict):
    return parse_run_spec(
        {
            "run_id": "t",
            "model": {"name_or_path": str(tiny_assets["model"]), "quantization": quantization},
            "adapter": LORA,
            "data": {"path": str(tiny_assets["train"]), "max_length": 16},
            "batch": {"target_batch_size": 4, "per_peer_batch_size": 4},
            "optimizer": {"lr": 0.01},
        }
    )


def named_trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


ON_GPU = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)
"""bitsandbytes' CUDA kernels instead of its CPU backend."""


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_trainer_trains_the_same_full_precision_adapter(tiny_assets, kind, device):
    spec = spec_for(tiny_assets, kind)
    model = build_model(spec, torch.device(device))
    plain = build_model(spec_for(tiny_assets, "none"), torch.device(device))
    assert isinstance(model.get_base_model().model.layers[0].mlp.down_proj.base_layer, QUANTIZED_LINEAR[kind])
    # what the swarm averages: the same tensors, by name, shape, dtype and (seeded) initial value
    quantized, unquantized = named_trainable(model), named_trainable(plain)
    assert quantized.keys() == unquantized.keys()
    for name, tensor in quantized.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, unquantized[name]), name

    ids = load_tokenizer(spec.model)(["1+2=3", "4+5=9", "7+1=8"], return_tensors="pt").input_ids.to(device)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=spec.optimizer.lr)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
    changed = [n for n, p in named_trainable(model).items() if not torch.equal(p, unquantized[n])]
    assert len(changed) == len(quantized)  # after the first step B is nonzero, so every A has a gradient too


def test_an_adapter_checkpoint_resumes_quantized_or_not(tiny_assets, tmp_path):
    """A checkpoint of a 4-bit peer is peft's adapter folder like any other: an unquantised (or 8-bit) peer resumes
    from it with the same trainable tensors, and the other way round."""
    cpu = torch.device("cpu")
    for saved_by, resumed_by in (("4bit", "none"), ("none", "4bit"), ("4bit", "8bit")):
        model = build_model(spec_for(tiny_assets, saved_by), cpu)
        with torch.no_grad():
            for parameter in trainable_parameters(model):
                parameter.add_(torch.randn_like(parameter))
        folder = tmp_path / f"{saved_by}-{resumed_by}"
        save_weights(model, folder)
        resumed = build_model(spec_for(tiny_assets, resumed_by), cpu, weights_from=str(folder))
        assert named_trainable(resumed).keys() == named_trainable(model).keys()
        for name, tensor in named_trainable(resumed).items():
            assert torch.equal(tensor, named_trainable(model)[name]), (saved_by, resumed_by, name)


def test_quantized_base_weights_take_less_memory(tiny_assets):
    """Bytes held of the tiny model's base (128 wide: embeddings and head, kept in float32, are most of it)."""
    held = {
        kind: held_bytes(load_base_model(spec_for(tiny_assets, kind).model, torch.device("cpu")))
        for kind in ("none", "8bit", "4bit")
    }
    assert held["4bit"] < held["8bit"] < held["none"] / 3, held


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_span_computes_what_the_quantized_model_does_and_trains_its_lora(
    tiny_assets, kind, device
):
    spec = spec_for(tiny_assets, kind)
    whole = load_base_model(spec.model, torch.device(device))
    ids = torch.tensor([[1, 5, 7, 3, 2, 9]], device=device)
    hidden = whole(input_ids=ids, output_hidden_states=True).hidden_states
    span = quantize_linears(load_block_span(tiny_assets["model"], 0, 1), spec.model, torch.device(device))
    span = span.to(device)  # the rest of the span, as the server moves it
    assert isinstance(span.layers[0].self_attn.q_proj, QUANTIZED_LINEAR[kind])
    with torch.no_grad():
        change = span(hidden[0]) - hidden[0]
    expected = hidden[1] - hidden[0]
    # 4-bit: the very layers transformers builds; 8-bit: transformers' outlier split differs by rounding
    assert (change - expected).norm() <= 0.02 * expected.norm()

    plain = SpanAdapter(load_block_span(tiny_assets["model"], 0, 1).to(device), spec.adapter, spec)
    adapter = SpanAdapter(
        span, spec.adapter, spec
    )  # peft's bitsandbytes LoRA layers around the quantised ones
    assert type(span.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    assert [(n, p.shape) for n, p in adapter.named] == [(n, p.shape) for n, p in plain.named]
    start = adapter.tensors()
    for _ in range(2):  # a client's backward twice: the second moves every tensor (B is nonzero by then)
        inputs = hidden[0].detach().requires_grad_(True)
        span(inputs).square().mean().backward()
        assert adapter.after_backward()  # a span step per backward request (accumulate_backwards 1)
    assert inputs.grad is not None and torch.isfinite(inputs.grad).all()  # what the server sends back
    assert all(
        not torch.equal(a, b) and torch.isfinite(b).all()
        for a, b in zip(start, adapter.tensors(), strict=True)
    )


@pytest.mark.integration
@pytest.mark.timeout(360)
def test_a_quantized_and_an_unquantized_peer_end_with_equal_adapters(make_spec, local_swarm, tmp_path):
    """Two real peers of one run, whose specs differ only in ``model.quantization`` (4-bit on ``a``, none on ``b``):
    they average the same LoRA tensors, so at the last global step their adapters are equal to the bit, while ``a``
    holds its base in fewer bytes. NOTE: equal adapters alone would also follow from averaging state alone; the
    rounds that succeeded show that gradients were averaged too."""
    steps = 4
    run = {
        "max_global_steps": steps,
        "adapter": {"kind": "lora", "r": 4},
        "averaging": {"target_group_size": 2},
    }
    unquantized = make_spec(**run)
    quantized = make_spec(
        model={**yaml.safe_load(unquantized.read_text())["model"], "quantization": "4bit"}, **run
    )

    swarm = local_swarm(quantized)
    a, address = start_first(swarm, "a", ["--save-dir", str(tmp_path / "a"), "--min-peers", "2"], tmp_path)
    b = swarm.start_peer(
        "b",
        ["--run-spec", str(unquantized), "--save-dir", str(tmp_path / "b"), "--min-peers", "2"],
        initial_peers=[address],
        use_spec=False,
    )
    assert swarm.wait_all(timeout=300) == [0, 0], "\n".join(p.log()[-3000:] for p in swarm.peers)

    assert a.summary().rounds.succeeded >= 1 and b.summary().rounds.succeeded >= 1, a.summary()
    assert a.summary().model_bytes < b.summary().model_bytes / 2, (a.summary(), b.summary())
    saved = [load_file(checkpoint_of(tmp_path / name, steps) / "adapter_model.safetensors") for name in "ab"]
    assert saved[0].keys() == saved[1].keys() and saved[0]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
