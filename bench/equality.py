"""Do 4 peers on loopback, without faults, end on bit-equal parameters, every round a group of all 4?

What is measured
    ``--peers`` ``run-peer`` processes on loopback (tiny model, target 256 of batches of 64, a checkpoint
    at every global step, ``--matchmaking-time`` as given, ``--min-peers`` all of them) train
    ``--steps`` global steps and exit. From their ``--results`` files and checkpoints: the share of
    rounds whose group held every peer, the global steps at which every peer's checkpoint is bit-equal,
    and whether the last one is. Repeated ``--runs`` times (issue 16 asks 10 of 10 equal).

    ``--strategy diloco`` runs DiLoCo instead (``--inner-steps`` H, overlap on, batches of 64): a global
    step is an outer step, and what must be equal at each is the *global* weights and outer momentum of
    the checkpoint's strategy state (the local weights differ between outer steps by design); at the
    last step the model itself is the global weights, so the last check is the model's, as for gradients.

How to read it
    One line per run, then ``equal_runs=K/N full_groups=…`` (median share of full groups, min, max).

Run: ``.venv/bin/python bench/equality.py --runs 10`` (about a minute per run on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from workdir import bit_equal, checkpoints, median_min_max, run_in_workdir, runs_parser, write_tiny_spec

from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.assets import build_assets


def one_run(spec_path: Path, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    names = [f"p{i}" for i in range(args.peers)]
    with LocalSwarm(spec_path, folder / "logs") as swarm:
        for i, name in enumerate(names):
            peer_args = ["--save-dir", str(folder / name), "--min-peers", str(args.peers)]
            peer = swarm.start_peer(name, peer_args, initial_peers=[] if i == 0 else None)
            swarm.wait_for_address(peer)
        codes = swarm.wait_all(timeout=args.timeout)
        failed = next((p for p, code in zip(swarm.peers, codes, strict=True) if code), None)
        if failed is not None:
            raise RuntimeError(f"exit codes {codes}; {failed.name}:\n{failed.log()[-3000:]}")
        rounds = [e for p in swarm.peers for e in p.events("averaging_round")]
    found = [checkpoints(folder / name) for name in names]
    common = sorted(set.intersection(*(set(f) for f in found)))
    same = outer_states_equal if args.strategy == "diloco" else bit_equal
    equal = [s for s in common if (bit_equal if s == common[-1] else same)([f[s] for f in found])]
    return {
        "full_groups": sum(r["group_size"] == args.peers for r in rounds) / max(len(rounds), 1),
        "equal_steps": len(equal) / max(len(common), 1),
        "last_equal": float(bool(common) and common[-1] in equal),
    }


def outer_states_equal(paths: list[Path]) -> bool:
    """Whether DiLoCo checkpoints hold the same global weights and outer momentum, to the bit."""
    first, *others = (torch.load(p / "strategy_state.pt", weights_only=False) for p in paths)
    keys = ("global_weights", "outer_momentum")
    return all(
        all(torch.equal(a, b) for key in keys for a, b in zip(first[key], other[key], strict=True))
        for other in others
    )


def run(workdir: Path, args: argparse.Namespace) -> int:
    build_assets(workdir)
    averaging = {
        "matchmaking_time": args.matchmaking_time,
        "averaging_timeout": max(15.0, 2 * args.matchmaking_time),
    }
    if args.fixed_size:
        averaging["target_group_size"] = args.peers
    if args.strategy == "diloco":
        averaging.update(strategy="diloco", inner_steps=args.inner_steps)
    spec_path = write_tiny_spec(
        workdir / "run.yaml", workdir, "bench-equality", 64 * args.peers, 64, averaging,
        max_global_steps=args.steps, checkpoint={"save_every": 1, "keep": 0},
    )  # fmt: skip
    results = []
    for r in range(1, args.runs + 1):
        folder = workdir / f"run{r}"
        shutil.rmtree(folder, ignore_errors=True)
        found = one_run(spec_path, folder, args)
        results.append(found)
        print(f"run {r}: " + " ".join(f"{k}={v:.2f}" for k, v in found.items()), flush=True)
    print(
        f"equal_runs={sum(r['last_equal'] for r in results):.0f}/{len(results)} "
        f"{median_min_max('full_groups', [r['full_groups'] for r in results], 2)} "
        f"peers={args.peers} matchmaking_time={args.matchmaking_time:g} fixed_size={args.fixed_size} "
        f"strategy={args.strategy}"
        + (f" inner_steps={args.inner_steps}" if args.strategy == "diloco" else "")
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = runs_parser(__doc__, runs=10)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="global steps per run")
    p.add_argument("--matchmaking-time", type=float, default=0.5)
    p.add_argument(
        "--fixed-size", action="store_true", help="target_group_size = --peers, as the demo sets it"
    )
    p.add_argument("--strategy", choices=["gradient", "diloco"], default="gradient")
    p.add_argument("--inner-steps", type=int, default=10, help="(diloco) H")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_in_workdir(run, parse_args(None), "equality"))
