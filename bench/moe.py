"""Training a mixture-of-experts LM whose experts live on expert servers, against the same model trained locally
(issue 20, acceptance 1 and 5).

What is measured
    Two ``run-peer --role experts`` processes on loopback serve the tiny Mixtral built here
    (``tools/tiny/families.py``: hidden 128, 2 MoE layers of 4 experts, 2 per token, router loss on): experts 0-1
    and 2-3 of every layer. This process is the trainer (``open_remote_moe_model``: attention, embeddings, norms,
    routers and head here, under AdamW; each server steps an expert with the spec's AdamW once per backward
    request, and the trainer asks for a step on a zero gradient of every expert a step routed no token to, so that
    every expert steps once per training step, as one AdamW over the local model does) and, side by side, the
    baseline: the same
    checkpoint by ``from_pretrained``, AdamW over all its parameters with the spec's settings. Both train on the
    same batches of the demo's arithmetic task (``tools/demo.DEMO_TASK``), in the same order, for ``--steps``
    steps at a constant learning rate, without clipping on either side. Then:

    - **held-out loss**: the mean cross-entropy per completion token over the task's held-out problems
      (``exact_match.held_out_loss``; the router's load-balancing loss is not in it); ``ratio`` = remote / local;
    - **noise floor**: a second ``from_pretrained`` model on the same batches with each batch's rows in another
      order, so that only floating-point rounding differs from the baseline; ``floor`` = its held-out loss /
      local's. Training this task is chaotic (it crosses a plateau whose length varies, ``tools/demo.py``): a
      loss ratio is only evidence where it stands apart from this one;
    - **tokens/s**: training tokens (not padding) per second of forward + backward + optimizer step;
      ``ratio`` = remote / local (issue 20's goal: >= 0.5 on loopback with 2 cores).

How it is measured
    Trainer, baseline and servers run one thread each (``torch.set_num_threads(1)``, servers with
    ``OMP_NUM_THREADS=1``). Steps go in blocks of ``--block``: remote and local train on a block's batches in
    turn, alternating which goes first (ABBA), and the noise-floor model after them, untimed; the first block
    warms up and is not timed; a run's tokens/s is the median over its timed blocks. Each of ``--runs`` runs
    starts fresh servers (experts back at the checkpoint) and walks the data in its own order (seed + run
    number), so the loss figures' spread is over data orders; min / median / max over runs are printed.
    Loopback has no real latency or bandwidth limit: the tokens/s ratio is the protocol's own cost
    (serialisation, p2p daemon hops, process switches, the servers' compute in other processes, their backward
    recomputing the expert's forward pass), a bound that a real network only lowers.

Run: ``.venv/bin/python bench/moe.py`` (2 min 12 s on 2 shared cores, 2026-12-05). Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM
from workdir import median_min_max, run_in_workdir, runs_parser

from potluck.peer.averaging.gradient import adamw_with_state
from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.exact_match import held_out_loss
from potluck.peer.training.model import NO_HUB_KERNELS, load_tokenizer
from potluck.protocols.runspec import RunSpec, load_run_spec
from potluck.tools.demo import DEMO_TASK
from potluck.tools.expert_swarm import moe_trainer, start_expert_servers
from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.model import TinyModelConfig, build_tiny_model
from potluck.tools.tiny.task import ALPHABET

PLACEMENT = {"experts-a": "0-1", "experts-b": "2-3"}
"""Server name → its ``--experts``: half of every MoE layer's experts each."""
FIGURES = (
    "loss_remote",
    "loss_local",
    "loss_ratio",
    "loss_floor",
    "tokens_per_s_remote",
    "tokens_per_s_local",
    "tokens_ratio",
)


def write_spec(workdir: Path, args: argparse.Namespace, run: int) -> Path:
    path = workdir / f"spec-{run}.yaml"
    path.write_text(yaml.safe_dump({
        "run_id": f"bench-moe-{run}",
        "model": {"name_or_path": str(workdir / "mixtral")},
        "data": {"path": str(workdir / "data" / "train.jsonl"), "eval_path": str(workdir / "data" / "eval.jsonl"),
                 "max_length": 16},
        # the demo's peak rate and betas; constant and unclipped, so that both sides follow one rule: a server
        # would count a schedule in its own expert's steps and clip each expert's gradient on its own
        "optimizer": {"lr": args.lr, "betas": [0.9, 0.98]},
        "batch": {"target_batch_size": args.batch, "per_peer_batch_size": args.batch},
        "seed": args.seed + run,
    }))  # fmt: skip
    return path


def train_step(model, optimizer, batch: dict[str, torch.Tensor]) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def train_side_by_side(models: dict[str, nn.Module], spec: RunSpec, tokenizer, args) -> dict[str, float]:
    """Train ``remote`` and ``local`` on the same batches in ABBA blocks, then ``floor`` on them with their rows
    reordered; tokens/s of remote and local (median over the timed blocks)."""
    sides = {
        name: (model.train(), adamw_with_state(model.parameters(), spec.optimizer))
        for name, model in models.items()
    }
    batches = PeerDataStream(spec.data, tokenizer, args.batch).batches(spec.seed)
    reorder = torch.Generator().manual_seed(spec.seed)
    rates: dict[str, list[float]] = {"remote": [], "local": []}
    for block in range(args.steps // args.block):
        chunk = [next(batches) for _ in range(args.block)]
        tokens = sum(int(b["attention_mask"].sum()) for b in chunk)
        for name in ("remote", "local") if block % 2 == 0 else ("local", "remote"):
            model, optimizer = sides[name]
            started = time.perf_counter()
            for batch in chunk:
                train_step(model, optimizer, batch)
            if block > 0:  # the first block warms up
                rates[name].append(tokens / (time.perf_counter() - started))
        for batch in chunk:
            rows = torch.randperm(batch["input_ids"].shape[0], generator=reorder)
            train_step(*sides["floor"], {key: value[rows] for key, value in batch.items()})
    remote_rate, local_rate = (statistics.median(rates[name]) for name in ("remote", "local"))
    return {
        "tokens_per_s_remote": remote_rate,
        "tokens_per_s_local": local_rate,
        "tokens_ratio": remote_rate / local_rate,
    }


def load_local(spec: RunSpec):
    return AutoModelForCausalLM.from_pretrained(
        spec.model.name_or_path, dtype=torch.float32, **NO_HUB_KERNELS
    )


def one_run(workdir: Path, args: argparse.Namespace, run: int) -> dict[str, float]:
    spec_path = write_spec(workdir, args, run)
    spec = load_run_spec(spec_path)
    tokenizer = load_tokenizer(spec.model)

    def held_out(model) -> float:
        return held_out_loss(
            model, tokenizer, spec.data.eval_path, max_length=spec.data.max_length, limit=None
        )

    swarm = LocalSwarm(spec_path, workdir / f"servers-{run}")
    try:
        servers = start_expert_servers(swarm, PLACEMENT)
        with moe_trainer(spec, servers) as (remote, client):
            models = {"remote": remote, "local": load_local(spec), "floor": load_local(spec)}
            start = held_out(models["local"])
            figures = train_side_by_side(models, spec, tokenizer, args)
            loss = {name: held_out(model) for name, model in models.items()}
            metrics = client.metrics
    finally:
        swarm.stop(grace=10)
    figures |= {
        "loss_remote": loss["remote"],
        "loss_local": loss["local"],
        "loss_ratio": loss["remote"] / loss["local"],
        "loss_floor": loss["floor"] / loss["local"],
    }
    print(
        f"run {run + 1}: held-out loss {start:.3f} -> remote {loss['remote']:.4f}, local {loss['local']:.4f} "
        f"(ratio {figures['loss_ratio']:.4f}, floor "
        f"{figures['loss_floor']:.4f}); tokens/s remote "
        f"{figures['tokens_per_s_remote']:.0f}, local {figures['tokens_per_s_local']:.0f} (ratio "
        f"{figures['tokens_ratio']:.3f}); expert requests {metrics.requests}, failed {metrics.failures}, "
        f"dropped {metrics.dropped}, backward dropped {metrics.backward_dropped}, idle steps {metrics.idle_steps}",
        flush=True,
    )
    return figures


def run(workdir: Path, args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    build_tiny_model(workdir / "mixtral", DEMO_TASK.corpus(), ALPHABET, TinyModelConfig(), family="mixtral")
    DEMO_TASK.write(workdir / "data")
    print(
        f"tiny Mixtral (hidden 128, 2 MoE layers x 4 experts, top-2): experts 0-1 and 2-3 on two servers; "
        f"{args.steps} steps of {args.batch} rows, lr {args.lr}, blocks of {args.block} (ABBA), {args.runs} runs",
        flush=True,
    )
    results = [one_run(workdir, args, run) for run in range(args.runs)]
    print(f"\n{'':22}{'min':>10}{'median':>10}{'max':>10}")
    for name in FIGURES:
        values = [r[name] for r in results]
        digits = 0 if name.startswith("tokens_per_s") else 4
        print(
            f"{name:22}"
            + "".join(f"{v:10.{digits}f}" for v in (min(values), statistics.median(values), max(values)))
        )
    last = (("loss_ratio", 4), ("loss_floor", 4), ("tokens_ratio", 3))
    print(" ".join(median_min_max(name, [r[name] for r in results], digits) for name, digits in last))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = runs_parser(__doc__)
    parser.add_argument("--steps", type=int, default=100, help="training steps per run (both sides)")
    parser.add_argument("--block", type=int, default=10, help="steps per timed block (ABBA)")
    parser.add_argument("--batch", type=int, default=128, help="rows per step (the demo's per-peer batch)")
    parser.add_argument("--lr", type=float, default=0.003, help="AdamW's learning rate (the demo's peak)")
    parser.add_argument("--seed", type=int, default=0, help="data order of run 1 (run k: seed + k - 1)")
    return run_in_workdir(run, parser.parse_args(argv), "moe")


if __name__ == "__main__":
    sys.exit(main())
