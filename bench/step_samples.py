"""How many samples go into one global step, against the spec's ``target_batch_size``?

What is measured
    ``--peers`` ``run-peer`` processes (``potluck.tools.peer_processes.LocalSwarm`` on loopback,
    ``--min-peers`` so they start together) train the demo's spec (``potluck.tools.demo.DEMO_SPEC``:
    target 256, per-peer batch 128, ``target_group_size`` = peers, as ``make demo`` sets it) for
    ``--steps`` global steps, ``--runs`` times. Every peer's ``--results`` file records, at each global
    step, the samples it has trained on so far; the samples of global step N are the sum over peers of
    what each added between its steps N-1 and N. A peer that skipped steps (it caught up by download)
    adds nothing to them.

    With 3 peers and batches of 128, each peer used to put one whole batch into every step: 384
    samples against a target of 256 (1.5x). Each peer now takes its share of the target
    (``SwarmAwareTracker.step_share`` in ``hivemind_ext/tracker.py``).

How to read it
    Per run: the ratio over the whole run (all samples in global steps ÷ (steps × target)) and the
    per-step ratios' min/median/max (the first steps, before the peers know each other's rates, take
    whole batches). The last line holds the runs' median of the whole-run ratio (goal: 1.0-1.1) and its
    min and max.

Run: ``.venv/bin/python bench/step_samples.py`` (about 1 minute per run of 60 steps on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml
from workdir import median_min_max, run_in_workdir, runs_parser

from potluck.tools.demo import DEMO_SPEC, DEMO_TASK
from potluck.tools.peer_processes import LocalSwarm, PeerProcess
from potluck.tools.tiny.assets import build_assets


def write_spec(workdir: Path, peers: int, steps: int) -> Path:
    spec = dict(DEMO_SPEC, max_global_steps=steps, checkpoint={"save_every": steps, "keep": 1})
    spec["averaging"] = dict(DEMO_SPEC["averaging"], target_group_size=peers)
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def samples_per_step(peers: list[PeerProcess]) -> dict[int, int]:
    """Global step -> samples the peers added to it (from each peer's ``global_step`` events)."""
    per_step: dict[int, int] = {}
    for peer in peers:
        before = 0
        for event in peer.events():
            if event.get("event") == "global_step":
                step, samples = event["global_step"], event["samples"]
                per_step[step] = per_step.get(step, 0) + samples - before
                before = samples
    return per_step


def run_swarm(spec_path: Path, folder: Path, peers: int, timeout: float) -> dict[int, int]:
    with LocalSwarm(spec_path, folder / "logs") as swarm:
        for i in range(1, peers + 1):
            args = ["--save-dir", str(folder / f"peer{i}"), "--min-peers", str(peers)]
            swarm.wait_for_address(swarm.start_peer(f"peer{i}", args))
        codes = swarm.wait_all(timeout=timeout)
        if any(codes):
            logs = "\n".join(
                f"--- {p.name} (exit {p.process.returncode}):\n{p.log()[-2000:]}" for p in swarm.peers
            )
            raise RuntimeError(f"a peer failed:\n{logs}")
        return samples_per_step(swarm.peers)


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def run(workdir: Path, args: argparse.Namespace) -> int:
    build_assets(workdir, DEMO_TASK)
    spec_path = write_spec(workdir, args.peers, args.steps)
    target = DEMO_SPEC["batch"]["target_batch_size"]
    whole_run = []
    for r in range(1, args.runs + 1):
        folder = workdir / f"run{r}"
        shutil.rmtree(folder, ignore_errors=True)  # peers would resume from an old run's checkpoints
        started = time.monotonic()
        per_step = run_swarm(spec_path, folder, args.peers, args.timeout)
        ratios = [per_step[s] / target for s in sorted(per_step)]
        whole = sum(per_step.values()) / (len(per_step) * target)
        whole_run.append(whole)
        print(
            f"run {r}: {len(per_step)} global steps in {time.monotonic() - started:.0f} s; samples per step / "
            f"target over the run {whole:.3f}; per step min / median / max {spread(ratios)}; "
            f"steps below the target {sum(x < 1 for x in ratios)}, above 1.1x {sum(x > 1.1 for x in ratios)}",
            flush=True,
        )
    print(f"whole-run ratio over {args.runs} runs, min / median / max: {spread(whole_run)}")
    print(
        f"{median_min_max('samples_ratio', whole_run)} peers={args.peers} steps={args.steps} runs={args.runs}"
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = runs_parser(__doc__)
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help="global steps per run")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_in_workdir(run, parse_args(None), "step-samples"))
