"""Averaging strategies and codecs side by side: held-out loss, bytes sent, compute utilisation.

What is measured
    For each case, two ``run-peer`` processes on loopback (``bench/convergence.py``'s ``run_swarm``:
    ``--min-peers 2``, one thread each) fine-tune the bundled tiny model on the bundled arithmetic task
    with the demo's settings (AdamW lr 3e-3, 10 warm-up steps, per-peer batch 64), under one averaging
    strategy and codec. Then a single process with a plain torch loop trains the same model from the
    same initial weights on as many samples as the swarm used (sum of both peers' ``M samples``) with
    batch 128 (``train_single`` from ``bench/convergence.py``): each row's **baseline at equal samples**.

    Cases (``--cases``, default all but the fp16 ones):

    - ``gradient-none``: per-step gradient averaging in fp32 (target batch 128): the reference for bytes;
    - ``gradient-uint8``: the same with 8-bit gradients;
    - ``diloco-none``, ``diloco-uint8``, ``diloco-quantile_8bit``: DiLoCo with ``inner_steps`` H
      (``--inner-steps``, default 50) local AdamW steps between outer steps (SGD-Nesterov 0.7 / 0.9);
    - ``diloco-fp16``, ``gradient-fp16`` on request.

    The gradient cases run ``--gradient-steps`` global steps (150 x 128 samples); the DiLoCo cases run
    ``--outer-steps`` outer steps (3 x 2 peers x H 50 x 64 = the same 19,200 samples), so that both use
    about as many samples (``samples``).

Shaped link (``--link-mbit``)
    Each peer runs in its own simulated host of ``tests/netbed`` (network namespaces; needs root): its
    access link is shaped to ``--link-mbit`` Mbit/s each way with ``tc tbf`` and delayed by
    ``--link-delay-ms`` each way (RTT between the peers = 4 x that). ``matchmaking_time`` is raised to
    2 s for every case (the loaded machine plus the RTT). Use fewer steps: a fp32 gradient round of the
    tiny model takes seconds at 20 Mbit/s.

Columns
    ``loss`` is peer 1's held-out loss at the end (``potluck.peer.training.exact_match``, per-token loss on the
    completions); ``vs single`` divides it by its own single-process baseline at equal samples;
    ``vs grad-fp32`` divides it by the ``gradient-none`` row's loss. ``sent/peer`` is the mean over peers
    of the payload bytes a peer sent in averaging rounds (the peers' ``averaging totals`` log line, i.e.
    ``potluck_averaging_sent_bytes_total``: computed from the serialised size of the averaged tensors
    and the group size, not counted on the socket); ``bytes vs grad-fp32`` is the ``gradient-none``
    row's bytes divided by this row's (how many times fewer). NOTE: the gradient strategy's count
    leaves out hivemind's state averaging (parameters and Adam statistics every ``average_state_every``
    steps), so the real factor is larger than printed. ``util`` is the mean compute utilisation
    (``potluck_compute_utilisation``: time in local steps not blocked on the swarm / wall time since
    the first step). ``w-diff`` is the largest difference between the two peers' final weights.

Run: ``.venv/bin/python bench/strategies.py`` (a few minutes per case on 2 CPU cores, ~12 under heavy load;
``--cases`` picks cases, ``--reuse`` re-evaluates swarms already run in ``--workdir``; ``--help``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from convergence import SPEC, PeerSummary, run_swarm, summarize_peer, train_single, weights_max_diff
from workdir import run_in_workdir

from potluck.peer.training.checkpoint import latest_checkpoint
from potluck.peer.training.exact_match import evaluate_spec
from potluck.protocols.runspec import load_run_spec
from potluck.tools.peer_processes import LocalSwarm, PeerProcess
from potluck.tools.tiny.assets import build_assets

PEERS = 2
REPO_ROOT = Path(__file__).resolve().parents[1]
ALL_CASES = (
    "gradient-none",
    "gradient-uint8",
    "diloco-none",
    "diloco-uint8",
    "diloco-quantile_8bit",
    "gradient-fp16",
    "diloco-fp16",
)
DEFAULT_CASES = ALL_CASES[:5]


@dataclass(frozen=True)
class Row:
    case: str
    global_steps: int
    samples: int
    loss: float
    single_loss: float
    sent_per_peer: float
    failed_rounds: int
    utilisation: float
    weights_diff: float
    seconds: float


def averaging_for(case: str, args: argparse.Namespace) -> tuple[dict, int]:
    strategy, compression = case.split("-", 1)
    averaging = dict(SPEC["averaging"], strategy=strategy, compression=compression)
    if args.link_mbit is not None:
        averaging["matchmaking_time"] = 2.0
    if strategy == "diloco":
        averaging["inner_steps"] = args.inner_steps
        return averaging, args.outer_steps
    return averaging, args.gradient_steps


def run_case(case: str, workdir: Path, args: argparse.Namespace) -> Row:
    averaging, steps = averaging_for(case, args)
    casedir = workdir / case
    spec = dict(
        SPEC,
        run_id=f"bench-{case.replace('_', '-')}",
        model={"name_or_path": str(workdir / "tiny-model")},
        data={k: str(workdir / v[2:]) if k.endswith("path") else v for k, v in SPEC["data"].items()},
        averaging=averaging,
        max_global_steps=steps,
        checkpoint={"save_every": steps, "keep": 1},
    )
    casedir.mkdir(parents=True, exist_ok=True)
    spec_path = casedir / "run.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_spec = load_run_spec(spec_path)

    print(f"== {case}: {PEERS} peers, {steps} global steps (logs: {casedir / 'logs'})", file=sys.stderr)
    started = time.monotonic()
    logs_dir = casedir / "logs"
    if args.reuse and all((logs_dir / f"peer{i}.events.jsonl").is_file() for i in range(1, PEERS + 1)):
        peers: list[PeerSummary] = [
            summarize_peer(
                PeerProcess(f"peer{i}", None, logs_dir / f"peer{i}.log", logs_dir / f"peer{i}.events.jsonl")
            )
            for i in range(1, PEERS + 1)
        ]  # a swarm that already ran in this --workdir: evaluate it again
    elif args.link_mbit is None:
        peers = run_swarm(spec_path, casedir, args.timeout)
    else:
        peers = run_swarm_shaped(spec_path, casedir, args)
    seconds = time.monotonic() - started
    checkpoints = [latest_checkpoint(casedir / p.name, run_spec.run_id) for p in peers]
    if any(c is None or c.global_step != steps for c in checkpoints):
        raise RuntimeError(f"{case}: expected final checkpoints at step {steps}, found {checkpoints}")
    loss = evaluate_spec(run_spec, checkpoint=checkpoints[0].path).loss
    samples = sum(p.samples for p in peers)
    target = run_spec.batch.target_batch_size
    single = [
        train_single(run_spec, round(samples / target), target, seed).loss for seed in range(args.seeds)
    ]
    return Row(
        case=case,
        global_steps=steps,
        samples=samples,
        loss=loss,
        single_loss=sum(single) / len(single),
        sent_per_peer=sum(p.bytes_sent for p in peers) / len(peers),
        failed_rounds=sum(p.failed_rounds for p in peers),
        utilisation=sum(p.compute_utilisation for p in peers) / len(peers),
        weights_diff=weights_max_diff(run_spec, checkpoints[0].path, checkpoints[1].path),
        seconds=seconds,
    )


def run_swarm_shaped(spec_path: Path, casedir: Path, args: argparse.Namespace) -> list[PeerSummary]:
    """``run_swarm``, with each peer in its own netbed host behind a shaped access link."""
    sys.path.insert(0, str(REPO_ROOT))  # tests/ is not installed; the test bed lives there
    from tests.netbed import Link, NetBed

    link = Link(rate_mbit=args.link_mbit, delay_ms=args.link_delay_ms)
    with NetBed() as bed, LocalSwarm(spec_path, casedir / "logs") as swarm:
        for i in range(1, PEERS + 1):
            host = bed.add_host(f"peer{i}", link, seed=i)
            peer_args = ["--host-maddrs", f"/ip4/{host.address}/tcp/0", "--save-dir", str(casedir / f"peer{i}"),
                         "--min-peers", str(PEERS)]  # fmt: skip
            peer = swarm.start_peer(f"peer{i}", peer_args, command_prefix=host.command([]))
            swarm.wait_for_address(peer, timeout=180)
        codes = swarm.wait_all(timeout=args.timeout)
        if any(codes):
            logs = "\n".join(f"--- {p.name}:\n{p.log()[-2000:]}" for p in swarm.peers)
            raise RuntimeError(f"a peer failed:\n{logs}")
        return [summarize_peer(p) for p in swarm.peers]


def print_table(rows: list[Row]) -> None:
    reference = next((r for r in rows if r.case == "gradient-none"), None)
    header = (
        f"{'case':<22}{'steps':>6}{'samples':>9}{'loss':>8}{'vs single':>10}{'vs grad-fp32':>13}"
        f"{'sent/peer':>12}{'bytes vs grad-fp32':>20}{'util':>7}{'failed':>7}{'w-diff':>10}{'time s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        vs_grad = f"{r.loss / reference.loss:.3f}" if reference else "-"
        fewer = (
            f"{reference.sent_per_peer / r.sent_per_peer:.1f}x fewer"
            if reference and r.sent_per_peer
            else "-"
        )
        print(
            f"{r.case:<22}{r.global_steps:>6}{r.samples:>9}{r.loss:>8.4f}{r.loss / r.single_loss:>10.3f}"
            f"{vs_grad:>13}{r.sent_per_peer / 2**20:>10.2f}MB{fewer:>20}{r.utilisation:>7.3f}"
            f"{r.failed_rounds:>7}{r.weights_diff:>10.2e}{r.seconds:>8.0f}"
        )
    for r in rows:
        pairs = {
            "case": r.case,
            "loss_ratio_single": f"{r.loss / r.single_loss:.3f}",
            "loss_ratio_gradient_fp32": f"{r.loss / reference.loss:.3f}" if reference else "-",
            "bytes_factor": f"{reference.sent_per_peer / r.sent_per_peer:.1f}"
            if reference and r.sent_per_peer
            else "-",
            "utilisation": f"{r.utilisation:.3f}",
        }
        print(" ".join(f"{k}={v}" for k, v in pairs.items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=ALL_CASES)
    p.add_argument("--gradient-steps", type=int, default=150, help="global steps of the gradient cases")
    p.add_argument("--inner-steps", type=int, default=50, help="DiLoCo's H")
    p.add_argument("--outer-steps", type=int, default=3, help="outer (global) steps of the DiLoCo cases")
    p.add_argument("--seeds", type=int, default=1, help="data orders of each single-process baseline")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one swarm may take")
    p.add_argument("--workdir", type=Path, default=None, help="keep assets, logs and checkpoints here")
    p.add_argument("--reuse", action="store_true", help="reuse finished swarms and assets in --workdir")
    p.add_argument("--link-mbit", type=float, default=None, help="shape each peer's link (tests/netbed)")
    p.add_argument("--link-delay-ms", type=float, default=15.0, help="one-way delay of each peer's link")
    return p.parse_args(argv)


def run(workdir: Path, args: argparse.Namespace) -> int:
    if not (args.reuse and (workdir / "tiny-model").is_dir()):
        build_assets(workdir)
    torch.set_num_threads(2)  # the baselines are not timed
    rows = []
    for case in args.cases:
        rows.append(run_case(case, workdir, args))
        print(f"   {rows[-1]}", file=sys.stderr, flush=True)  # a long run's figures so far
    print()
    print_table(rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_in_workdir(run, parse_args(argv), "strategies")


if __name__ == "__main__":
    sys.exit(main())
