"""A training step and a generated token through remote block spans, against the same model run locally.

What is measured
    Three ``run-peer --role shard`` processes on loopback serve the bundled tiny model (or a wider
    one, ``--hidden``/``--layers``): blocks ``0:L/2`` once and ``L/2:L`` twice (a replica). This
    process is the client (``potluck.peer.shard``) and, side by side on the same weights, the local
    baseline (``transformers`` ``from_pretrained``):

    - **train step**: prompt tuning (8 virtual tokens), batch ``--batch`` × ``--tokens`` tokens,
      forward + backward + AdamW on the prompt. Remote: through both spans (2 forward and 2
      backward requests). Local: the whole model in this process.
    - **token**: one greedy token with attention caches (remote: an inference session, 2 requests;
      local: ``model.generate`` with its cache), timed after the prompt's prefill.
    - **failover**: training steps through the spans while the server of the replicated span that
      the client's route uses is killed mid-step (between forward and backward); reports the
      replays, the time the client spent on failed requests and re-routing (``retry_seconds``), and
      that step's time against the median step.

How it is measured
    Both sides use ``torch.set_num_threads(1)`` (servers run with ``OMP_NUM_THREADS=1``). After a
    warm-up, remote and local blocks alternate (ABBA); each figure is the median over blocks of the
    block's mean time; ``ratio`` = remote / local. Loopback has no bandwidth limit or real latency:
    the ratio is the protocol's own cost (serialisation, p2p daemon hops, process switches), a lower
    bound for a real network.

Run: ``python bench/shards.py`` (about a minute on 2 cores). Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from potluck.peer.shard.client.remote_model import RemoteCausalLM, open_remote_model
from potluck.peer.training.model import NO_HUB_KERNELS
from potluck.protocols.runspec import load_run_spec
from potluck.protocols.shards import read_shards
from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.model import TinyModelConfig, build_tiny_model
from potluck.tools.tiny.task import ALPHABET, ArithmeticTask


def _local_step(model, prompt, optimizer, ids, labels):
    embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), model.get_input_embeddings()(ids)], dim=1)
    logits = model(inputs_embeds=embeds).logits[:, prompt.shape[0] :]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _remote_step(model: RemoteCausalLM, optimizer, ids, labels):
    model(ids, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _timed(fn, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def side_by_side(remote_fn, local_fn, blocks: int, repeats: int) -> tuple[float, float]:
    remote_fn(), local_fn()  # warm-up
    remote_times, local_times = [], []
    for i in range(blocks):
        pair = [(remote_fn, remote_times), (local_fn, local_times)]
        for fn, times in pair if i % 2 == 0 else pair[::-1]:
            times.append(_timed(fn, repeats))
    return statistics.median(remote_times), statistics.median(local_times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--blocks", type=int, default=6, help="timed blocks per side")
    p.add_argument("--repeats", type=int, default=5, help="steps (tokens) per block")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    task = ArithmeticTask()
    config = TinyModelConfig(
        hidden_size=args.hidden, num_layers=args.layers, intermediate_size=2 * args.hidden, max_positions=128
    )
    model_dir = build_tiny_model(work / "model", task.corpus(), ALPHABET, config)
    spec_path = work / "spec.yaml"
    train, _ = task.write(work / "data")
    spec_path.write_text(yaml.safe_dump({
        "run_id": "bench-shards",
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(train)},
        "batch": {"target_batch_size": args.batch, "per_peer_batch_size": args.batch},
    }))  # fmt: skip
    spec = load_run_spec(spec_path)
    half = args.layers // 2
    swarm = LocalSwarm(spec_path, work / "servers", extra_args=["--role", "shard"])
    dht = None
    try:
        first = swarm.start_peer("server-a", ["--blocks", f"0:{half}"])
        address = swarm.wait_for_address(first)
        for name in ("server-b", "server-c"):
            swarm.start_peer(name, ["--blocks", f"{half}:{args.layers}"], initial_peers=[address])
        dht, remote = open_remote_model(spec, [address])
        deadline = time.monotonic() + 120
        while len(read_shards(dht, spec.run_id).records) < 3:
            if time.monotonic() > deadline:
                raise TimeoutError("the 3 shard servers did not announce themselves within 120 s")
            time.sleep(0.5)
        local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **NO_HUB_KERNELS)
        torch.manual_seed(0)
        ids = torch.randint(4, 20, (args.batch, args.tokens))
        tuned = RemoteCausalLM(remote.parts, remote.client, prompt_tokens=8)
        local_prompt = torch.nn.Parameter(tuned.prompt.detach().clone())
        remote_opt = torch.optim.AdamW([tuned.prompt], lr=1e-3)
        local_opt = torch.optim.AdamW([local_prompt], lr=1e-3)
        step_remote, step_local = side_by_side(
            lambda: _remote_step(tuned, remote_opt, ids, ids),
            lambda: _local_step(local, local_prompt, local_opt, ids, ids),
            args.blocks,
            args.repeats,
        )
        prompt_ids = ids[:1, :8]
        new = args.repeats * 4
        local.eval()

        def remote_tokens():
            return remote.generate(prompt_ids, max_new_tokens=new)

        def local_tokens():
            return local.generate(prompt_ids, max_new_tokens=new, do_sample=False, pad_token_id=0)

        def prefill_remote():
            return remote.generate(prompt_ids, max_new_tokens=1)

        def prefill_local():
            return local.generate(prompt_ids, max_new_tokens=1, do_sample=False, pad_token_id=0)

        full_r, full_l = side_by_side(remote_tokens, local_tokens, args.blocks, 1)
        pre_r, pre_l = side_by_side(prefill_remote, prefill_local, args.blocks, 1)
        token_remote, token_local = (full_r - pre_r) / (new - 1), (full_l - pre_l) / (new - 1)

        # failover: kill the replicated span's routed server between forward and backward
        times, before = [], remote.client.metrics.snapshot()
        for step in range(6):
            started = time.perf_counter()
            loss = tuned(ids, labels=ids).loss
            if step == 3:
                victim_id = remote.client.router.route(half, args.layers)[0].peer_id
                victim = next(s for s in swarm.peers if f"shard server {victim_id}" in s.log())
                os.killpg(victim.process.pid, signal.SIGKILL)
            loss.backward()
            remote_opt.step()
            remote_opt.zero_grad()
            times.append(time.perf_counter() - started)
        after = remote.client.metrics.snapshot()
    finally:
        if dht is not None:
            remote.client.shutdown()
            dht.shutdown()
        swarm.stop(grace=10)

    print(
        f"model: hidden {args.hidden}, {args.layers} blocks in 2 spans; batch {args.batch} x {args.tokens} tokens"
    )
    print(f"{'':14}{'remote ms':>11}{'local ms':>10}{'ratio':>8}")
    print(
        f"{'train step':14}{step_remote * 1e3:11.1f}{step_local * 1e3:10.1f}{step_remote / step_local:8.2f}"
    )
    print(f"{'token':14}{token_remote * 1e3:11.2f}{token_local * 1e3:10.2f}{token_remote / token_local:8.2f}")
    median = statistics.median(times[:3] + times[4:])
    print(
        f"failover: replays {after['replays'] - before['replays']}, failed requests "
        f"{after['failures'] - before['failures']}, retry_seconds "
        f"{after['retry_seconds'] - before['retry_seconds']:.3f}; the step with the kill took "
        f"{times[3] * 1e3:.0f} ms against a median of {median * 1e3:.0f} ms"
    )
    print(f"train_step_ratio={step_remote / step_local:.2f} token_ratio={token_remote / token_local:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
