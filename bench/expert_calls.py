"""Where a remote MoE step's time goes: one MoE layer's expert calls through two expert servers, against the same
experts computed in this process.

What is measured
    Two ``run-peer --role experts`` processes on loopback serve the tiny Mixtral (hidden 128), experts 0-1 and 2-3
    of every layer, as in ``bench/moe.py``. This process calls layer 0's experts the way a trainer does
    (``ExpertClient.forward``/``backward``: one request per expert, all at once) with ``--tokens`` tokens per
    expert, for 1 expert, 2 (one per server) and 4 (two per server); and, side by side, computes the same
    experts here (``experts.load_experts``: forward; backward and an AdamW step, as a server does on a backward
    request). Each figure is the median of ``--repeats`` calls in a block; remote and local blocks alternate
    (ABBA) over ``--runs`` runs, and min / median / max over runs are printed. ``overhead`` = remote - local: what
    the request costs beyond the computation (serialisation, the p2p daemons' hops, the server's queue and
    thread switches, its backward's recomputed forward pass).

Run: ``.venv/bin/python bench/expert_calls.py`` (about a minute on 2 cores). Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from workdir import run_in_workdir, runs_parser

from potluck.peer.averaging.gradient import adamw_with_state
from potluck.peer.shard.experts import load_experts
from potluck.protocols.runspec import load_run_spec
from potluck.tools.expert_swarm import moe_trainer, start_expert_servers
from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.model import TinyModelConfig, build_tiny_model
from potluck.tools.tiny.task import ALPHABET, ArithmeticTask

PLACEMENT = {"experts-a": "0-1", "experts-b": "2-3"}
CASES = {"1 expert": [0], "2 experts, one per server": [0, 2], "4 experts, two per server": [0, 1, 2, 3]}


def main() -> int:
    parser = runs_parser(__doc__)
    parser.add_argument(
        "--tokens", type=int, default=500, help="tokens per expert (the bench's batch sends ~500)"
    )
    parser.add_argument("--repeats", type=int, default=20)
    return run_in_workdir(run, parser.parse_args(), "expert-calls")


def run(workdir: Path, args) -> int:
    torch.set_num_threads(1)
    model_dir = build_tiny_model(
        workdir / "mixtral", ArithmeticTask().corpus(), ALPHABET, TinyModelConfig(), "mixtral"
    )
    spec_path = workdir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "run_id": "bench-expert-calls", "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(workdir / "unused.jsonl")}, "batch": {"target_batch_size": 1, "per_peer_batch_size": 1},
    }))  # fmt: skip
    spec = load_run_spec(spec_path)
    local = load_experts(model_dir, [(0, e) for e in range(4)])
    for expert in local.values():
        expert.requires_grad_(True)
    optimizers = {uid: adamw_with_state(list(e.parameters()), spec.optimizer) for uid, e in local.items()}
    hidden = torch.randn(args.tokens, local[(0, 0)].gate.in_features)
    figures: dict[str, list[float]] = {}

    def local_forward(experts):
        with torch.no_grad():
            for e in experts:
                local[(0, e)](hidden)

    def local_backward(experts):
        for e in experts:  # as a server: recompute, backward, step
            x = hidden.detach().requires_grad_(True)
            local[(0, e)](x).backward(hidden)
            optimizers[(0, e)].step()
            optimizers[(0, e)].zero_grad()

    swarm = LocalSwarm(spec_path, workdir / "logs")
    try:
        servers = start_expert_servers(swarm, PLACEMENT)
        with moe_trainer(spec, servers) as (_, client):
            calls = {
                ("remote", "forward"): lambda ex: client.forward(0, {e: hidden for e in ex}),
                ("remote", "backward"): lambda ex: client.backward(0, {e: (hidden, hidden) for e in ex}, {}),
                ("local", "forward"): local_forward,
                ("local", "backward"): local_backward,
            }
            for call in calls.values():  # warm-up
                call([0, 1, 2, 3])
            for run_index in range(args.runs):
                for case, experts in CASES.items():
                    for method in ("forward", "backward"):
                        times = {}
                        order = ("remote", "local") if run_index % 2 == 0 else ("local", "remote")
                        for side in order:
                            samples = []
                            for _ in range(args.repeats):
                                started = time.perf_counter()
                                calls[(side, method)](experts)
                                samples.append(time.perf_counter() - started)
                            times[side] = statistics.median(samples) * 1000
                        for side in ("remote", "local"):
                            figures.setdefault(f"{case} | {method} | {side} ms", []).append(times[side])
                        figures.setdefault(f"{case} | {method} | overhead ms", []).append(
                            times["remote"] - times["local"]
                        )
                print(f"run {run_index + 1} done", file=sys.stderr, flush=True)
            print(f"{client.metrics.failures} failed expert requests", file=sys.stderr)
    finally:
        swarm.stop()
    print(
        f"\n{args.tokens} tokens per expert, layer 0 of the tiny Mixtral, {args.runs} runs of {args.repeats} calls"
    )
    print(f"{'':<52}{'min':>9}{'median':>9}{'max':>9}")
    for name, values in figures.items():
        print(f"{name:<52}{min(values):>9.2f}{statistics.median(values):>9.2f}{max(values):>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
