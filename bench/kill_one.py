"""How soon do the others step on after one peer of three is killed with ``kill -9``?

What is measured
    Three ``run-peer`` processes on loopback (tiny model, target 96 of batches of 32, ``--min-peers 3``,
    ``averaging_timeout`` 15 s, ``--matchmaking-time`` as given, ``target_group_size`` 3 with
    ``--fixed-size``) train until each has taken 5 global steps; then the third is killed with
    SIGKILL (it withdraws nothing: its progress record stays until it expires, 60 s). From the two
    survivors' ``--results`` files: the time from the kill to each one's next global step, and the
    outcomes of their first rounds after it. Repeated ``--runs`` times.

How to read it
    The last line holds ``next_step_s`` (the survivors' median over runs) with its min and max, and
    ``in_periods`` (that median ÷ ``matchmaking_time``; issue 16 asks for at most 2).

Run: ``.venv/bin/python bench/kill_one.py`` (about a minute per run on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from workdir import median_min_max, run_in_workdir, runs_parser, wait_for, write_tiny_spec

from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.assets import build_assets

PEERS = 3


def write_spec(workdir: Path, args: argparse.Namespace) -> Path:
    averaging = {"matchmaking_time": args.matchmaking_time, "averaging_timeout": 15}
    if args.fixed_size:
        averaging["target_group_size"] = PEERS
    return write_tiny_spec(workdir / "run.yaml", workdir, "bench-kill-one", 96, 32, averaging)


def one_run(spec_path: Path, folder: Path) -> list[tuple[float, list[str]]]:
    """For each survivor: (seconds from the kill to its next global step, outcomes of its next rounds)."""
    with LocalSwarm(spec_path, folder / "logs") as swarm:
        peers = []
        for i in range(PEERS):
            peer = swarm.start_peer(
                f"p{i}", ["--min-peers", str(PEERS)], initial_peers=[] if i == 0 else None
            )
            swarm.wait_for_address(peer)
            peers.append(peer)
        wait_for(lambda: min(len(p.events("global_step")) for p in peers) >= 5, 300, "5 global steps each")
        os.kill(peers[-1].process.pid, signal.SIGKILL)
        killed = time.time()
        survivors = peers[:-1]

        def after_the_kill():
            found = [[e for e in p.events("global_step") if e["time"] > killed] for p in survivors]
            return found if all(found) else None

        steps = wait_for(after_the_kill, 120, "global step of each survivor after the kill")
        time.sleep(5)  # the rounds after that first step, for their outcomes
        return [
            (
                found[0]["time"] - killed,
                [e["outcome"] for e in p.events("averaging_round") if e["time"] > killed][:5],
            )
            for p, found in zip(survivors, steps, strict=True)
        ]


def run(workdir: Path, args: argparse.Namespace) -> int:
    build_assets(workdir)
    spec_path = write_spec(workdir, args)
    waits = []
    for r in range(1, args.runs + 1):
        folder = workdir / f"run{r}"
        shutil.rmtree(folder, ignore_errors=True)
        for seconds, outcomes in one_run(spec_path, folder):
            waits.append(seconds)
            print(
                f"run {r}: next global step {seconds:.2f} s after the kill; next rounds {outcomes}",
                flush=True,
            )
    print(
        f"{median_min_max('next_step_s', waits, 2)} "
        f"in_periods={statistics.median(waits) / args.matchmaking_time:.2f} "
        f"matchmaking_time={args.matchmaking_time:g} fixed_size={args.fixed_size} runs={args.runs}"
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = runs_parser(__doc__)
    p.add_argument("--matchmaking-time", type=float, default=1.0)
    p.add_argument("--fixed-size", action="store_true", help="target_group_size 3, as the demo sets it")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_in_workdir(run, parse_args(None), "kill-one"))
