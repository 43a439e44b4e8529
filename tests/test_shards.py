"""Block-span servers as real processes on loopback, and a client that routes through them.

One module-scoped swarm of four ``run-peer --role shard`` servers, started without ``--blocks``
(each picks the blocks the swarm covers worst) on the 2-block tiny model: two replicas per block.
Tests that kill a server come last and each kills a replica of a span that still has two.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from transformers import AutoModelForCausalLM

from potluck.peer.shard import streaming, wire
from potluck.peer.shard.client.generate import generate_text
from potluck.peer.shard.client.remote_model import RemoteCausalLM, open_remote_model
from potluck.peer.shard.client.routing import Hop
from potluck.peer.shard.server.announce import coverage
from potluck.peer.training.data import (
    PeerDataStream,
    collate,
    detect_format,
    load_rows,
    row_turns,
    tokenize_example,
)
from potluck.peer.training.model import load_tokenizer
from potluck.peer.training.stages.sft import SupervisedFineTuning
from potluck.protocols.runspec import load_run_spec
from potluck.protocols.shards import read_shards
from tests.conftest import _STARTED_GROUPS, _TrackedSwarm
from tests.helpers import wait_until

pytestmark = pytest.mark.slow
NUM_BLOCKS = 2  # the tiny model's


@pytest.fixture(scope="module")
def spec_path(tiny_assets, tmp_path_factory):
    spec = {
        "run_id": "shard-run",
        "model": {"name_or_path": str(tiny_assets["model"])},
        "data": {"path": str(tiny_assets["train"]), "eval_path": str(tiny_assets["eval"]), "max_length": 16},
        "optimizer": {"lr": 0.05},
        "batch": {"target_batch_size": 32, "per_peer_batch_size": 32},
        "seed": 0,
    }
    path = tmp_path_factory.mktemp("shards") / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def servers(spec_path):
    """Four shard servers started one after another without --blocks; yields (swarm, coverage after 3)."""
    swarm = _TrackedSwarm(
        spec_path, spec_path.parent / "servers", extra_args=["--role", "shard", "--num-blocks", "1"]
    )
    try:
        first = swarm.start_peer("server0")
        address = swarm.wait_for_address(first)
        chosen = [_wait_for_event(first, "blocks_chosen")]
        for i in range(1, 4):
            peer = swarm.start_peer(f"server{i}", initial_peers=[address])
            chosen.append(_wait_for_event(peer, "blocks_chosen"))
        for peer in swarm.peers:
            _wait_for_event(peer, "serving")
        yield swarm, chosen
    finally:
        swarm.stop(grace=10)


def _wait_for_event(peer, kind: str, timeout: float = 120.0) -> tuple[int, int]:
    """``(start, end)`` of the server's first ``kind`` event (``blocks_chosen`` or ``serving``)."""

    def found():
        if not peer.running:
            raise RuntimeError(f"{peer.name} exited:\n{peer.log()[-3000:]}")
        events = peer.events(kind)
        return (events[0]["start"], events[0]["end"]) if events else None

    return wait_until(found, timeout, f"a {kind!r} event from {peer.name}")


@pytest.fixture(scope="module")
def remote(servers, spec_path):
    swarm, _ = servers
    spec = load_run_spec(spec_path)
    dht, model = open_remote_model(spec, [swarm.peers[0].join_address()], request_timeout=20.0)
    try:
        # all four announced and reachable
        wait_until(lambda: len(read_shards(dht, spec.run_id).records) == 4, 60, "4 shard announcements")
        yield spec, model
    finally:
        model.client.shutdown()
        dht.shutdown()


@pytest.fixture(scope="module")
def local_model(tiny_assets):
    return AutoModelForCausalLM.from_pretrained(tiny_assets["model"], dtype=torch.float32).eval()


def _ask(model: RemoteCausalLM, hop: Hop, tensors: list[torch.Tensor], **metadata) -> list[torch.Tensor]:
    """What ``hop``'s server answers one forward request (a refusal raised as :class:`wire.RemoteError`), without
    the client's failover, which would ban it for a refusal and ask a replica (``client/refusals.py``)."""
    message = wire.request(tensors, start=hop.start, end=hop.end, **metadata)
    reply = RemoteExpertWorker.run_coroutine(model.client._call_async(hop.peer_id, "forward", message))
    return wire.unpack_response(reply)


def _kill_route_server(swarm, model: RemoteCausalLM, start: int, end: int) -> str:
    """SIGKILL the server the client's router would use for ``start:end`` now; return its peer id."""
    peer_id = model.client.router.route(start, end)[0].peer_id
    victim = next(p for p in swarm.peers if p.peer_id() == peer_id)
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait(timeout=30)
    return peer_id


def test_servers_without_blocks_cover_the_model(servers, remote):
    _, chosen = servers
    spec, model = remote
    spans = chosen
    assert {block for start, end in spans[:3] for block in range(start, end)} == set(range(NUM_BLOCKS))
    announced = list(read_shards(model.client.router.dht, spec.run_id).records.values())
    assert [count for count, _ in coverage(announced, NUM_BLOCKS)] == [2, 2]  # the 4th filled the gap


def test_forward_and_gradients_through_two_remote_spans_equal_local(remote, local_model):
    spec, model = remote
    route = model.client.router.route(0, NUM_BLOCKS)
    assert [(h.start, h.end) for h in route] == [(0, 1), (1, 2)]
    torch.manual_seed(1)
    ids = torch.randint(4, 30, (3, 12))
    remote_model = RemoteCausalLM(model.parts, model.client, prompt_tokens=4, seed=1)
    local_prompt = remote_model.prompt.detach().clone().requires_grad_(True)
    upstream = torch.randn(3, 12, local_model.config.vocab_size)  # not .sum(): see the issue

    logits = remote_model(ids).logits
    (logits * upstream).sum().backward()

    embeds = torch.cat([local_prompt.expand(3, -1, -1), local_model.get_input_embeddings()(ids)], dim=1)
    embeds.retain_grad()
    local_logits = local_model(inputs_embeds=embeds).logits[:, 4:]
    (local_logits * upstream).sum().backward()

    torch.testing.assert_close(logits, local_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(remote_model.prompt.grad, local_prompt.grad, atol=1e-5, rtol=0)
    assert remote_model.prompt.grad.abs().sum() > 0

    _assert_remote_blocks_equal_local(model, local_model, rows=2, tokens=9)


def _assert_remote_blocks_equal_local(model: RemoteCausalLM, local_model, rows: int, tokens: int) -> None:
    """The blocks alone, as the client's autograd function: output and input gradient (with a random
    upstream gradient) equal the local model's."""
    hidden = torch.randn(rows, tokens, local_model.config.hidden_size, requires_grad=True)
    grad_out = torch.randn(rows, tokens, local_model.config.hidden_size)
    remote_output = model.client.blocks(hidden)
    remote_output.backward(grad_out)
    local_hidden = hidden.detach().clone().requires_grad_(True)
    output = local_hidden
    rotary = local_model.model.rotary_emb(output, torch.arange(tokens)[None])
    for layer in local_model.model.layers:
        output = layer(output, position_embeddings=rotary, attention_mask=None)
    output.backward(grad_out)
    torch.testing.assert_close(remote_output, output, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad, local_hidden.grad, atol=1e-5, rtol=0)


def test_a_left_padded_batch_through_two_spans_equals_its_rows_one_by_one(remote):
    """Forward, backward and generation, with a trained prompt in front of every row (after its pads)."""
    _, model = remote
    torch.manual_seed(2)
    lengths = [12, 9, 5]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, 12 - length :] = torch.randint(4, 30, (length,))
        mask[row, 12 - length :] = 1
    remote_model = RemoteCausalLM(model.parts, model.client, prompt_tokens=4, seed=1)
    upstream = torch.randn(3, 12, model.parts.config.vocab_size)

    logits = remote_model(ids, attention_mask=mask).logits
    (logits * upstream * mask[:, :, None]).sum().backward()
    batch_grad, remote_model.prompt.grad = remote_model.prompt.grad, None
    for row, length in enumerate(lengths):
        alone = remote_model(ids[row : row + 1, 12 - length :]).logits
        torch.testing.assert_close(alone[0], logits[row, 12 - length :], atol=1e-5, rtol=0)
        (alone[0] * upstream[row, 12 - length :]).sum().backward()
    # the rows' gradients summed (to float rounding: the sums run in another order)
    assert (batch_grad - remote_model.prompt.grad).norm() <= 1e-5 * batch_grad.norm()

    with torch.no_grad():
        batch = remote_model.generate(ids, max_new_tokens=5, attention_mask=mask)
        for row, length in enumerate(lengths):
            alone = remote_model.generate(ids[row : row + 1, 12 - length :], max_new_tokens=5)
            assert torch.equal(batch[row, 12 - length :], alone[0]), f"row {row}"

    hop = model.client.router.route(0, 1)[0]
    with pytest.raises(wire.RemoteError, match=r"padding: expected a list of 2 integers") as error:
        _ask(model, hop, [torch.zeros(2, 4, 128)], padding=[1])
    assert error.value.kind == wire.BAD_REQUEST


def test_a_prefix_through_two_spans_equals_the_local_model_after_the_same_prefix(remote, local_model):
    """Prefix tuning as peft does it: the prefix's keys and values in every block's cache before the tokens."""
    from transformers.cache_utils import DynamicCache

    _, model = remote
    tuned = RemoteCausalLM(model.parts, model.client, prefix_tokens=3, seed=4)
    local_prefix = tuned.prefix.detach().clone().requires_grad_(True)
    torch.manual_seed(3)
    ids = torch.randint(4, 30, (2, 10))
    upstream = torch.randn(2, 10, model.parts.config.vocab_size)

    logits = tuned(ids).logits
    (logits * upstream).sum().backward()
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(local_prefix):
        cache.update(keys.expand(2, -1, -1, -1), values.expand(2, -1, -1, -1), layer)
    local_logits = local_model(ids, past_key_values=cache).logits
    (local_logits * upstream).sum().backward()
    torch.testing.assert_close(logits, local_logits, atol=1e-5, rtol=0)
    assert (tuned.prefix.grad - local_prefix.grad).norm() <= 1e-5 * local_prefix.grad.norm()
    assert tuned.prefix.grad.abs().sum() > 0

    # the reference pass leaves the prefix out: the plain model's logits
    with torch.no_grad():
        reference = tuned.without_adapters()(ids).logits
        torch.testing.assert_close(reference, local_model(ids).logits, atol=1e-5, rtol=0)
        # generation after the prefix: a padded batch generates what each row generates alone
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        batch = tuned.generate(ids, max_new_tokens=4, attention_mask=mask)
        assert torch.equal(batch[0], tuned.generate(ids[:1], max_new_tokens=4)[0])
        assert torch.equal(batch[1, 4:], tuned.generate(ids[1:, 4:], max_new_tokens=4)[0])

    hop = model.client.router.route(0, 1)[0]
    for prefix, offset, problem in [
        (torch.zeros(1, 2, 2, 3, 64), 3, r"prefix: shape \(1, 2, 2, 3, 64\), expected \(1, 2, 2, 3, 32\)"),
        (
            torch.zeros(1, 2, 2, 3, 32),
            5,
            r"position_offset: 5, but the tokens after a prefix of 3 start there",
        ),
    ]:
        with pytest.raises(wire.RemoteError, match=problem):
            _ask(model, hop, [torch.zeros(1, 4, 128), prefix], position_offset=offset, prefix_tokens=3)


def test_an_activation_above_4_mib_goes_through_the_servers_forward_and_backward(remote, local_model):
    _, model = remote
    failures_before = model.client.metrics.failures
    # 256 rows × 40 tokens × 128 floats: 5 MiB each way, 10 MiB for a backward request (in chunks)
    assert streaming.needs_streaming(wire.request([torch.zeros(256, 40, local_model.config.hidden_size)]))
    _assert_remote_blocks_equal_local(model, local_model, rows=256, tokens=40)
    assert model.client.metrics.failures == failures_before  # no server failed over it


@pytest.mark.parametrize(
    ("tensor", "field"),
    [
        (torch.zeros(1, 4, 128, dtype=torch.float16), "hidden: dtype torch.float16"),
        (torch.zeros(1, 4, 7), "hidden: shape (1, 4, 7)"),
        (torch.zeros(300, 1, 128), "hidden: 300 rows"),
        (torch.full((1, 4, 128), float("nan")), "hidden: contains NaN or Inf"),
        (torch.zeros(1, 100, 128), "position_offset: 0 + 100 tokens exceeds"),
    ],
)
def test_malformed_requests_get_a_clear_error_and_the_server_keeps_serving(remote, tensor, field):
    _, model = remote
    hop = model.client.router.route(0, 1)[0]
    failures_before = model.client.metrics.failures
    with pytest.raises(wire.RemoteError, match=re.escape(field)) as error:
        _ask(model, hop, [tensor])
    assert error.value.kind == wire.BAD_REQUEST
    with pytest.raises(wire.RemoteError, match="start/end: 0:2 is not within"):
        _ask(model, Hop(hop.peer_id, 0, 2), [torch.zeros(1, 2, 128)])
    # the same server still serves a good request, and was not banned for the client's mistake
    (output,) = model.client.call(hop, "forward", [torch.randn(1, 4, 128)])
    assert output.shape == (1, 4, 128) and torch.isfinite(output).all()
    assert model.client.metrics.failures == failures_before


def test_a_flood_of_bad_requests_leaves_server_memory_bounded_and_the_server_serving(servers, remote):
    swarm, _ = servers
    _, model = remote
    hop = model.client.router.route(0, 1)[0]
    server = psutil.Process(next(p for p in swarm.peers if p.peer_id() == hop.peer_id).process.pid)
    truncated = wire.request([torch.zeros(2, 4, 128)], start=0, end=1)
    truncated.tensors[0].buffer = truncated.tensors[0].buffer[:100]
    garbage_metadata = wire.request([torch.zeros(1, 4, 128)])
    garbage_metadata.metadata = b"\xc1"
    # 3 MiB each (under hivemind's 4 MiB message limit): they pass the size checks and are decoded
    big_nan = wire.request([torch.full((96, 64, 128), float("nan"))], start=0, end=1)
    big_float64 = wire.request([torch.zeros(48, 64, 128, dtype=torch.float64)], start=0, end=1)
    kinds = [big_nan, big_float64, big_nan, big_float64, truncated, garbage_metadata,
             wire.request([torch.zeros(300, 1, 128)], start=0, end=1),
             wire.request([torch.zeros(1, 4, 128)] * 3, start=0, end=1)]  # fmt: skip

    def flood(rounds: int) -> None:
        async def one_round():
            calls = [model.client._call_async(hop.peer_id, "forward", message) for message in kinds]
            return await asyncio.gather(*calls)

        for _ in range(rounds):
            for reply in RemoteExpertWorker.run_coroutine(one_round()):
                with pytest.raises(wire.RemoteError) as error:
                    wire.unpack_response(reply)
                assert error.value.kind == wire.BAD_REQUEST, error.value

    flood(4)  # warm-up: the allocator's high-water mark for a round of concurrent requests
    resident_before = server.memory_info().rss
    flood(40)  # 160 requests of 3 MiB: a leak of each would add ~480 MiB
    growth = server.memory_info().rss - resident_before
    assert growth < 160 * 2**20, f"the server's memory grew by {growth / 2**20:.0f} MiB"
    (output,) = model.client.call(hop, "forward", [torch.randn(1, 4, 128)])
    assert output.shape == (1, 4, 128) and not model.client.router.is_banned(hop.peer_id)


def test_remote_greedy_generation_equals_local_even_when_a_server_dies(servers, remote, local_model):
    swarm, _ = servers
    spec, model = remote
    tokenizer = load_tokenizer(spec.model)
    row = load_rows(spec.data.eval_path)[0]
    prompt, _ = row_turns(row, detect_format(row, "auto"))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    expected = local_model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    assert torch.equal(model.generate(ids, max_new_tokens=12), expected)

    # kill the block-1 server mid-generation: a replica rebuilds the cache from the kept inputs
    replays_before = model.client.metrics.replays
    killed: list[str] = []
    generated: list[torch.Tensor] = []

    def kill_after_four(token: torch.Tensor) -> None:
        if len(generated) == 3:
            killed.append(_kill_route_server(swarm, model, 1, 2))
        generated.append(token)

    tokens = model.generate(ids, max_new_tokens=12, on_token=kill_after_four)
    assert killed
    assert torch.equal(tokens, expected)
    assert model.client.metrics.replays > replays_before


def test_generate_cli_through_shards_equals_local(servers, spec_path):
    swarm, _ = servers
    spec = load_run_spec(spec_path)
    local_text = generate_text(spec, "7+5=", max_new_tokens=8).text
    command = [sys.executable, "-m", "potluck.tools.cli", "generate", "--run-spec", str(spec_path),
               "--prompt", "7+5=", "--max-new-tokens", "8", "--remote",
               "--initial-peers", swarm.peers[0].join_address()]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    _STARTED_GROUPS.add(process.pid)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert out.rstrip("\n") == local_text
    assert "replays" in err


def _held_out_loss(model: RemoteCausalLM, spec) -> float:
    tokenizer = load_tokenizer(spec.model)
    rows = load_rows(spec.data.eval_path)[:48]
    fmt = detect_format(rows[0], "auto")
    batch = collate(
        [tokenize_example(r, fmt, tokenizer, spec.data.max_length) for r in rows], tokenizer.pad_token_id
    )
    with torch.no_grad():
        return float(model(**batch).loss)


def test_prompt_tuning_through_spans_keeps_training_when_a_replica_dies(servers, remote):
    swarm, _ = servers
    spec, model = remote
    tuned = RemoteCausalLM(model.parts, model.client, prompt_tokens=8, seed=spec.seed)
    optimizer = torch.optim.AdamW([tuned.prompt], lr=spec.optimizer.lr)
    stage = SupervisedFineTuning()
    batches = PeerDataStream(spec.data, load_tokenizer(spec.model), spec.batch.per_peer_batch_size).batches(0)
    before = _held_out_loss(tuned, spec)
    replays_before = model.client.metrics.replays
    losses = []
    for step in range(12):
        loss = stage.loss(tuned, next(batches))
        if step == 4:  # mid-step, between forward and backward; block 0 still has both replicas
            _kill_route_server(swarm, model, 0, 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    after = _held_out_loss(tuned, spec)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert model.client.metrics.replays > replays_before
    assert after < before, (before, after, losses)


def run_client(swarm, spec_path, adapter: dict, stage: str, steps: int = 2, extra_args: tuple[str, ...] = ()):
    """``run-peer --role client`` for ``steps`` global steps of ``stage`` with ``adapter`` through the swarm's
    servers; returns its summary once it has exited cleanly."""
    spec = yaml.safe_load(spec_path.read_text())
    spec.update(adapter=adapter, stage=stage)
    if stage == "dpo":  # the tiny task's preference pairs, beside its rows
        data = Path(spec["data"]["path"]).parent
        spec["data"] = {**spec["data"], "path": str(data / "preferences_train.jsonl"),
                        "eval_path": str(data / "preferences_eval.jsonl")}  # fmt: skip
    client_spec = spec_path.parent / f"client-{adapter['kind']}-{stage}.yaml"
    client_spec.write_text(yaml.safe_dump(spec))
    address = next(p.join_address() for p in swarm.peers if p.running)
    client = swarm.start_peer(
        f"client-{adapter['kind']}-{stage}",
        ["--role", "client", "--run-spec", str(client_spec), "--max-steps", str(steps), *extra_args],
        initial_peers=[address],
    )
    assert client.process.wait(timeout=180) == 0, client.log()[-3000:]
    summary = client.summary()
    assert (summary.role, summary.global_step, summary.exit_reason) == ("client", steps, "max_steps"), summary
    assert summary.last_loss is not None and summary.last_loss >= 0, summary  # a number, not NaN
    return summary


@pytest.mark.parametrize(
    ("adapter", "stage"),
    [({"kind": "prompt_tuning", "num_virtual_tokens": 4}, "sft"), ({"kind": "prefix", "num_virtual_tokens": 4}, "sft"),
     ({"kind": "prefix", "num_virtual_tokens": 4}, "dpo")],
    ids=["prompt-sft", "prefix-sft", "prefix-dpo"],
)  # fmt: skip
def test_run_peer_client_role_trains_its_adapter_through_the_servers(servers, spec_path, adapter, stage):
    swarm, _ = servers
    run_client(swarm, spec_path, adapter, stage)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_peer_client_role_computes_its_parts_on_the_gpu_it_is_given(servers, spec_path):
    swarm, _ = servers
    summary = run_client(
        swarm, spec_path, {"kind": "prefix", "num_virtual_tokens": 4}, "dpo", extra_args=("--gpu", "0")
    )
    assert summary.peak_gpu_memory_bytes, (
        summary
    )  # its embeddings, head, prefix and reference logits were there
