"""Shard pieces that need no server process: span choice, routing over signed DHT announcements,
the announcement schema, and the server's batching queue."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from potluck.hivemind_ext.dht import start_dht
from potluck.hivemind_ext.keys import peer_id_of_owner
from potluck.peer.shard import wire
from potluck.peer.shard.blocks import load_block_span
from potluck.peer.shard.client.refusals import Refusals
from potluck.peer.shard.client.routing import ForgedAnnouncement, Hop, NoRouteError, Router
from potluck.peer.shard.server.announce import choose_span
from potluck.peer.shard.server.batching import BatchingExecutor, ServerBusy
from potluck.peer.shard.server.service import ServerLimits, ShardServicer
from potluck.protocols.records import public_key_tag
from potluck.protocols.shards import (
    SHARD_PROTOCOL_VERSION,
    ShardAnnouncement,
    announce_shard,
    read_shards,
    shard_record_validators,
    shards_key,
)

pytestmark = pytest.mark.unit


def _announcement(peer: str, start: int, end: int, throughput: float = 100.0, state: str = "online"):
    return ShardAnnouncement(
        run_id="units", peer_id=peer, start=start, end=end, throughput=throughput, state=state,
        version=SHARD_PROTOCOL_VERSION, announced_at=time.time(),
    )  # fmt: skip


def test_choose_span_fills_gaps_before_adding_replicas():
    assert choose_span([], 6, 2) == (0, 2)
    taken = [_announcement("a", 0, 2), _announcement("b", 2, 4)]
    assert choose_span(taken, 6, 2) == (4, 6)
    full = [*taken, _announcement("c", 4, 6, throughput=10.0)]
    assert choose_span(full, 6, 2) == (4, 6)  # every block served once: the slowest span gets a replica
    assert choose_span([*full, _announcement("d", 4, 6, state="offline")], 6, 2) == (4, 6)
    assert choose_span([], 3, 8) == (0, 3)  # never longer than the model


def test_announcement_schema_rejects_empty_spans_and_non_finite_throughput():
    with pytest.raises(ValueError, match="empty span 3:3"):
        _announcement("a", 3, 3)
    with pytest.raises(ValueError, match="throughput"):
        _announcement("a", 0, 1, throughput=float("inf"))


@pytest.fixture(scope="module")
def dht():
    node = start_dht(
        [], ["/ip4/127.0.0.1/tcp/0"], [], None, record_validators=shard_record_validators(None, "units")
    )
    yield node
    node.shutdown()


def test_router_takes_the_cheapest_cover_and_avoids_banned_servers(dht):
    from hivemind.utils.timed_storage import get_dht_time

    # a node signs with its own key: a record filed under another key's subkey is refused
    stranger = public_key_tag(RSAPrivateKey())
    assert not dht.store(shards_key("units"), subkey=stranger, value=_announcement("x", 0, 4).dict(),
                         expiration_time=get_dht_time() + 60)  # fmt: skip
    own = public_key_tag(RSAPrivateKey.process_wide())
    fast = peer_id_of_owner(own)  # a server announces the peer id of the key it signs with
    assert announce_shard(dht, own, _announcement(fast, 0, 4, 1000.0), ttl=60)
    bad = _announcement("x", 0, 1).dict() | {"throughput": "fast"}
    assert not dht.store(shards_key("units"), subkey=own, value=bad, expiration_time=get_dht_time() + 60)

    router = Router(dht, "units", ban_seconds=60)
    assert router.route(0, 4) == [Hop(fast, 0, 4)]
    assert router.route(1, 3) == [Hop(fast, 1, 3)]  # a hop may use part of a server's span
    router.ban(fast)
    with pytest.raises(NoRouteError, match="no reachable server covers block 0"):
        router.route(0, 4)


def test_router_prefers_measured_latency_and_throughput(dht):
    router = Router(dht, "units", refresh_seconds=1e9)
    router._refreshed_at = time.monotonic()  # use the servers below, not the DHT's
    router.servers = {a.peer_id: a for a in [
        _announcement("front", 0, 2, 100.0), _announcement("back", 2, 4, 100.0),
        _announcement("all-but-far", 0, 4, 100.0),
    ]}  # fmt: skip
    router.observe_latency("all-but-far", 5.0)
    assert [h.peer_id for h in router.route(0, 4)] == ["front", "back"]
    router.observe_latency("all-but-far", 0.001, alpha=1.0)
    assert [h.peer_id for h in router.route(0, 4)] == ["all-but-far"]


def test_a_server_measured_slow_once_is_probed_again_once_its_measure_is_stale(dht):
    answers = {"replica-a": 0.001, "replica-b": 5.0}  # b's first probe lands on a busy moment
    probed = []

    def probe(peer_id: str, announcement) -> float:
        probed.append(peer_id)
        return answers[peer_id]

    router = Router(dht, "units", refresh_seconds=1e9, probe=probe, spread=4.0, reprobe_seconds=3600)
    router._refreshed_at = time.monotonic()  # use the servers below, not the DHT's
    router.servers = {a.peer_id: a for a in [
        _announcement("replica-a", 0, 4, 1e6), _announcement("replica-b", 0, 4, 1e6),
    ]}  # fmt: skip
    assert {h.peer_id for _ in range(50) for h in router.route(0, 4)} == {"replica-a"}
    assert sorted(probed) == ["replica-a", "replica-b"]  # each probed once while its measure is fresh

    answers["replica-b"] = 0.001  # b is as quick as a now
    router.reprobe_seconds = 0.0
    chosen = {h.peer_id for _ in range(50) for h in router.route(0, 4)}
    assert chosen == {"replica-a", "replica-b"}, chosen  # probed again, it takes its share


def test_batching_merges_waiting_requests_and_refuses_when_full():
    executor = BatchingExecutor(max_batch_tokens=1000, max_queue=3)
    batches = []
    executor.on_batch = lambda requests, rows: batches.append((requests, rows))
    started, release = threading.Event(), threading.Event()

    def blocking(inputs):
        started.set()
        release.wait(10)
        return [inputs[0] * 2]

    def double(inputs):
        return [inputs[0] * 2]

    async def scenario():
        first = asyncio.ensure_future(executor.submit([torch.ones(1, 4)], blocking))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)  # the thread is busy
        waiting = [
            asyncio.ensure_future(executor.submit([torch.full((2, 4), i)], double, key="k")) for i in (1, 2)
        ]
        other = asyncio.ensure_future(executor.submit([torch.zeros(1, 4)], double, key="other"))
        await asyncio.sleep(0)  # the three submissions above enter the queue
        with pytest.raises(ServerBusy, match="queue is full"):
            await executor.submit([torch.zeros(1, 4)], double)
        release.set()
        return await first, await asyncio.gather(*waiting), await other

    try:
        _, (one, two), _ = asyncio.run(scenario())
    finally:
        executor.shutdown()
    assert torch.equal(one[0], torch.full((2, 4), 2.0)) and torch.equal(two[0], torch.full((2, 4), 4.0))
    assert (2, 4) in batches  # the two "k" requests ran as one batch of 4 rows; "other" ran alone
    assert (1, 1) in batches


def test_a_forged_claim_on_a_servers_peer_id_is_dropped_without_banning_the_server(dht):
    def probe(peer_id, announcement):
        if (announcement.start, announcement.end) != (0, 4):  # what the server answers it serves
            raise ForgedAnnouncement(f"{peer_id} serves 0:4")
        return 0.01

    router = Router(dht, "units", refresh_seconds=1e9, probe=probe)
    router._refreshed_at = time.monotonic()  # use the servers below, not the DHT's
    router.servers = {"real": _announcement("real", 2, 4, 1e6), "slow": _announcement("slow", 0, 4, 1.0)}
    assert router.route(0, 4) == [Hop("slow", 0, 4)]  # the forged 2:4 claim is not used...
    assert not router.is_banned("real")  # ...nor held against the server it names
    assert router.forged == {("real", 2, 4)} and router.skipped["forged"] == 1


def test_undecodable_metadata_is_the_senders_fault():
    garbage = wire.request([])
    garbage.metadata = b"\xc1\xff"  # not MessagePack
    with pytest.raises(wire.RemoteError, match="metadata: cannot decode") as error:
        wire.metadata_of(garbage)
    assert error.value.kind == wire.BAD_REQUEST
    reply = wire.response([])
    reply.metadata = b"\x93\x01\x02\x03"  # a list, not a mapping
    with pytest.raises(wire.RemoteError, match="expected a mapping") as error:
        wire.unpack_response(reply)
    assert error.value.kind == wire.INTERNAL  # a malformed response makes the client fail over


@pytest.fixture
def servicer(tiny_assets):
    span = load_block_span(tiny_assets["model"], 0, 2)
    servicer = ShardServicer(span, "units", ServerLimits(max_request_tokens=256))
    yield servicer
    servicer.shutdown()


def test_servicer_refuses_oversized_declared_shapes_before_decoding(servicer):
    request = wire.request([torch.zeros(1, 2, 128)], start=0, end=2)
    request.tensors[0].size[:] = [4096, 64, 128]  # claims 128 MiB; the buffer holds 1 KiB

    async def scenario():
        return await servicer._handle("forward", request, servicer._forward)

    with pytest.raises(wire.RemoteError, match=r"hidden: shape \(4096, 64, 128\) exceeds") as error:
        wire.unpack_response(asyncio.run(scenario()))
    assert error.value.kind == wire.BAD_REQUEST


def test_servicer_refuses_a_concurrent_step_of_the_same_inference_session(servicer):
    def step(offset: int, tokens: int):
        request = wire.request(
            [torch.randn(1, tokens, 128)], start=0, end=2, position_offset=offset, session="s"
        )
        return servicer._handle("inference", request, lambda r: servicer._inference(r, "client"))

    async def scenario():
        await step(0, 4)  # the session's prefill
        # both next steps claim position 4; the second must not run against a cache of the wrong length
        return await asyncio.gather(step(4, 1), step(4, 1))

    first, second = asyncio.run(scenario())
    assert wire.unpack_response(first)[0].shape == (1, 1, 128)
    with pytest.raises(wire.RemoteError, match="session: its previous step is still running"):
        wire.unpack_response(second)
    assert servicer.sessions[("client", "s")].tokens == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"adapter": {"kind": "none"}}, "adapter.kind: --role client trains prompt_tuning, prefix, lora adapters, "
                                        "got 'none' (a full fine-tune would train the servers' frozen blocks)"),
        ({"adapter": {"kind": "ia3"}}, "adapter.kind: --role client trains prompt_tuning, prefix, lora adapters, "
                                       "got 'ia3'"),
        ({"adapter": {"kind": "lora"}, "stage": "grpo"}, "stage: --role client supports sft and dpo, got 'grpo'"),
        ({"adapter": {"kind": "prefix", "num_virtual_tokens": 300}},
         "adapter.num_virtual_tokens: 300, but shard servers take a prefix of at most 256 tokens"),
    ],
)  # fmt: skip
def test_run_peer_client_role_refuses_what_it_cannot_train_in_one_line(make_spec, capsys, overrides, message):
    from potluck.peer.cli import main

    assert main(["--role", "client", "--run-spec", str(make_spec(**overrides))]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"run-peer: {message}"


def test_read_shards_skips_other_versions_other_runs_and_other_servers_ids_and_counts_them(dht):
    own = public_key_tag(RSAPrivateKey.process_wide())
    current = peer_id_of_owner(own)
    for announcement, reason in [
        (_announcement(current, 0, 4).copy(update={"version": "0"}), "version"),
        (_announcement(current, 0, 4).copy(update={"run_id": "another-run"}), "malformed"),
        # another server's id: clients would call that server for blocks it may not serve, and ban it
        (_announcement("QmSomebodyElse", 0, 4), "peer_id_mismatch"),
    ]:
        # filed under this run's key, by a signed owner: valid records the reader must still refuse
        assert dht.store(shards_key("units"), subkey=own, value=announcement.dict(),
                         expiration_time=time.time() + 60 + len(reason))  # fmt: skip
        result = read_shards(dht, "units")
        assert result.records == {} and result.skipped[reason] == 1, result
    assert announce_shard(dht, own, _announcement(current, 0, 4), ttl=120)
    assert [a.peer_id for a in read_shards(dht, "units").records.values()] == [current]


def test_a_refusal_is_raised_only_when_another_server_refuses_the_same_blocks_or_none_is_left():
    unbanned: list[str] = []
    refusals = Refusals("forward pass", unbanned.append)
    refused = wire.RemoteError("forward: hidden: bad", wire.BAD_REQUEST)
    refusals.note("a", wire.RemoteError("forward: out of memory", wire.INTERNAL), (0, 2))  # not a refusal
    refusals.note("a", refused, (0, 1))
    refusals.note("a", refused, (0, 1))  # the same server again: still one server's word
    refusals.note("b", refused, (1, 2))  # other blocks: another request
    refusals.none_left(NoRouteError("none"), (2, 4))  # no refusal of those blocks: nothing to raise
    assert unbanned == []
    both = (
        r"forward pass: refused as malformed \(server a on blocks 0:1 answered forward: hidden: bad; server c"
    )
    with pytest.raises(wire.RemoteError, match=both) as error:
        refusals.note("c", refused, (0, 2))
    assert error.value.kind == wire.BAD_REQUEST and unbanned == ["a", "c"]  # they were right

    alone = Refusals("backward of expert 0.1", unbanned.append)
    alone.note("d", refused)
    with pytest.raises(wire.RemoteError, match=r"server d answered .*; no other server is left to ask$"):
        alone.none_left()
    assert unbanned[-1] == "d"
