"""A shard server's span adapter without a server process: its optimizer policy (backward requests accumulated
into one span step, the learning-rate schedule), its checkpoints (resumed exactly, others refused in one line)
and the spec fields behind them."""

from __future__ import annotations

import pytest
import torch

from potluck.peer.shard.blocks import load_block_span
from potluck.peer.shard.server.adapters import SpanAdapter
from potluck.peer.shard.server.span_checkpoint import (
    SpanCheckpointError,
    checkpointed_blocks,
    resume_span_adapter,
    save_span_adapter,
)
from potluck.protocols.runspec import RunSpecError, parse_run_spec

pytestmark = pytest.mark.unit


def _spec(tiny_assets, adapter=None, **sections):
    lora = {"kind": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    return parse_run_spec(
        {
            "run_id": "span-units",
            "model": {"name_or_path": str(tiny_assets["model"])},
            "adapter": adapter if adapter and "kind" in adapter else {**lora, **(adapter or {})},
            "data": {"path": str(tiny_assets["train"])},
            "batch": {"target_batch_size": 4, "per_peer_batch_size": 4},
            **sections,
        }
    )


def _served(spec, tiny_assets, blocks=(0, 1)):
    span = load_block_span(tiny_assets["model"], *blocks)
    return span, SpanAdapter(span, spec.adapter, spec)


def _gradients(span, seed: int) -> None:
    """Backward of one client's request (seeded inputs and output gradient) through ``span``."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, span.hidden_size, generator=generator)
    span(hidden).backward(torch.randn(2, 5, span.hidden_size, generator=generator))


def _backward(span, adapter: SpanAdapter, seed: int) -> bool:
    """One backward request as the servicer serves it: recompute, backward, count it."""
    with adapter.lock:
        _gradients(span, seed)
        return adapter.after_backward()


def test_n_backward_requests_make_one_step_on_their_mean_gradient(tiny_assets):
    spec = _spec(tiny_assets, span_adapter={"accumulate_backwards": 3}, optimizer={"lr": 0.01})
    span, adapter = _served(spec, tiny_assets)
    reference_span, reference = _served(spec, tiny_assets)  # the same start: seeded by the run
    before = adapter.tensors()
    per_request = []
    for seed in range(3):
        reference.optimizer.zero_grad(set_to_none=True)
        _gradients(reference_span, seed)
        per_request.append([p.grad.clone() for p in reference.parameters])
        stepped = _backward(span, adapter, seed)
        if seed < 2:  # gradients wait for the third request
            assert not stepped and adapter.steps == 0
            assert all(torch.equal(a, b) for a, b in zip(adapter.tensors(), before, strict=True))
    assert stepped and adapter.steps == 1 and adapter.pending == 0
    assert any(not torch.equal(a, b) for a, b in zip(adapter.tensors(), before, strict=True))
    for parameter, *grads in zip(adapter.parameters, *per_request, strict=True):
        # AdamW's first moment after one step is (1 - beta1) x the gradient it stepped on: the mean, not the sum
        torch.testing.assert_close(adapter.optimizer.state[parameter]["exp_avg"], 0.1 * sum(grads) / 3)


def test_the_learning_rate_follows_the_runs_warmup_and_schedule_in_span_steps(tiny_assets):
    spec = _spec(
        tiny_assets,
        optimizer={"lr": 0.1, "warmup_steps": 2, "schedule": "linear"},
        span_adapter={"accumulate_backwards": 2},
        max_global_steps=4,
    )
    span, adapter = _served(spec, tiny_assets)
    rates = []
    for request in range(8):
        if request % 2 == 0:
            rates.append(adapter.learning_rate)
        _backward(span, adapter, request)
    assert adapter.steps == 4
    assert rates == pytest.approx([0.05, 0.1, 0.1, 0.05])  # warm-up over 2 steps, then linear decay to 0 at 4
    assert adapter.learning_rate == pytest.approx(0.0)


def test_a_checkpoint_resumes_the_adapter_its_statistics_and_its_step(tiny_assets, tmp_path):
    spec = _spec(tiny_assets, optimizer={"lr": 0.01, "warmup_steps": 4})
    span, adapter = _served(spec, tiny_assets)
    for seed in range(3):
        _backward(span, adapter, seed)
    with adapter.lock:
        saved = save_span_adapter(tmp_path, spec.run_id, (0, 1), adapter, keep=2)
    assert saved.global_step == 3 and checkpointed_blocks(tmp_path, spec.run_id) == (0, 1)

    restarted_span, restarted = _served(spec, tiny_assets)
    assert resume_span_adapter(tmp_path, spec.run_id, (0, 1), restarted) == saved
    assert restarted.steps == 3 and restarted.learning_rate == adapter.learning_rate
    with adapter.lock, restarted.lock:
        for a, b in zip(adapter.state_tensors(), restarted.state_tensors(), strict=True):
            assert torch.equal(a, b)
    # the same next request moves both alike: AdamW's step count and the schedule came back too
    _backward(span, adapter, 7)
    _backward(restarted_span, restarted, 7)
    for a, b in zip(adapter.tensors(), restarted.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_a_checkpoint_of_other_blocks_or_another_adapter_is_refused_in_one_line(tiny_assets, tmp_path):
    spec = _spec(tiny_assets)
    _, adapter = _served(spec, tiny_assets)
    with adapter.lock:
        save_span_adapter(tmp_path, spec.run_id, (0, 1), adapter, keep=2)

    _, other_blocks = _served(spec, tiny_assets, (1, 2))
    with pytest.raises(SpanCheckpointError, match=r"blocks 0:1, not of the blocks 1:2") as refused:
        resume_span_adapter(tmp_path, spec.run_id, (1, 2), other_blocks)
    assert "\n" not in str(refused.value)

    wider = _spec(tiny_assets, adapter={"r": 8})
    _, wider_adapter = _served(wider, tiny_assets)
    with pytest.raises(SpanCheckpointError, match=r"other shapes .*adapter\.r") as refused:
        resume_span_adapter(tmp_path, spec.run_id, (0, 1), wider_adapter)
    assert "\n" not in str(refused.value) and wider_adapter.steps == 0

    # another run's checkpoint in the same --save-dir is not this run's: nothing to resume, as for a trainer
    assert resume_span_adapter(tmp_path, "another-run", (0, 1), adapter) is None


def test_span_adapter_fields_are_checked(tiny_assets):
    with pytest.raises(
        RunSpecError, match=r"span_adapter\.accumulate_backwards: .*greater than or equal to 1"
    ):
        _spec(tiny_assets, span_adapter={"accumulate_backwards": 0})
    with pytest.raises(RunSpecError, match=r"span_adapter: only used with adapter\.kind 'lora'"):
        _spec(tiny_assets, adapter={"kind": "none"}, span_adapter={"average_every": 9})


def test_a_backward_request_whose_gradients_overflow_leaves_the_adapter_as_it_was(tiny_assets):
    """Finite inputs can still overflow (a huge output gradient): one client must not turn every client's adapter
    into NaN. The servicer also never merges such requests into one batch, so each is counted on its own."""
    import asyncio

    from potluck.peer.shard import wire
    from potluck.peer.shard.server.service import ServerLimits, ShardServicer

    spec = _spec(tiny_assets, optimizer={"lr": 0.01})
    span, adapter = _served(spec, tiny_assets)
    servicer = ShardServicer(span, spec.run_id, ServerLimits(), adapter=adapter)
    hidden = torch.randn(2, 5, span.hidden_size)

    def backward(grad_output: torch.Tensor):
        request = wire.request([hidden, grad_output], start=0, end=1)
        return servicer._handle("backward", request, servicer._backward)

    async def scenario(*grads):
        return await asyncio.gather(*(backward(g) for g in grads))

    try:
        before = adapter.tensors()
        (reply,) = asyncio.run(scenario(torch.full_like(hidden, 3e38)))
        wire.unpack_response(reply)  # the client still gets its input gradient back, whatever it is worth
        assert (adapter.steps, adapter.dropped) == (0, 1)
        assert all(torch.equal(a, b) for a, b in zip(before, adapter.tensors(), strict=True))
        # two requests that arrive together: two span steps (accumulate_backwards 1), not one on their sum
        asyncio.run(scenario(torch.randn_like(hidden), torch.randn_like(hidden)))
        assert adapter.steps == 2
        assert all(torch.isfinite(t).all() for t in adapter.tensors())
    finally:
        servicer.shutdown()
