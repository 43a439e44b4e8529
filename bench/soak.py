"""Soak: a small swarm trains for a long time while its peers are killed and restarted (issue #7,
acceptance 9). Is resident memory bounded, and does any peer get stuck?

What it does
    ``--peers`` peers (default 3) on loopback (``LocalSwarm``) train the bundled tiny task
    (target_batch_size 256, per_peer_batch_size 64). Every ``--kill-every`` seconds (± 50 %, seeded
    by ``--seed``) a random peer gets ``kill -9`` and is restarted at once with the same
    ``--identity-path``; it downloads the swarm's state from the others. Every ``--sample-every``
    seconds each live peer is sampled:

    - RSS of its whole process tree (psutil: the peer, its DHT and averager processes, ``p2pd``, the
      lifeline watchdog), the sum of the processes' RSS (shared memory counts once per process);
    - its global step (``potluck_global_step`` of its ``/metrics``).

What it prints
    A line per minute while running, then one row per peer *incarnation* (a slot's process between
    two kills): its lifetime, RSS when it took its first global step + ``--warmup`` seconds, at the
    end and its maximum, the RSS growth in MB per hour (least-squares slope of the samples after the
    warm-up; only for incarnations that lived ``--min-life`` seconds after it), the global steps it
    took and the longest time it went without one.

    The summary line gives, per slot, the largest growth per hour among its incarnations, and
    ``stuck``: the incarnations that went more than ``--stuck-after`` seconds without a global step
    (counted from their start plus ``--startup-grace``, the time a restart may take to load torch,
    join and download the state). The exit status is 1 if a peer got stuck or a peer exited by
    itself.

Run: ``.venv/bin/python bench/soak.py --minutes 30`` (``--csv FILE`` keeps every sample).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import random
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from potluck.tools.coordinator_process import free_port
from potluck.tools.peer_processes import LocalSwarm, PeerProcess
from potluck.tools.tiny.assets import build_assets

MB = 1024 * 1024


@dataclass
class Incarnation:
    slot: str
    number: int
    peer: PeerProcess
    metrics_port: int
    started: float
    ended: float | None = None
    # (seconds since the soak began, tree RSS in bytes, global step or None)
    samples: list[tuple[float, int, float | None]] = field(default_factory=list)
    first_step_at: float | None = None
    last_change_at: float | None = None
    last_step: float | None = None
    longest_gap: float = 0.0
    steps: int = 0

    @property
    def name(self) -> str:
        return f"{self.slot}#{self.number}"


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):  # exited between the listing and the read
            total += process.memory_info().rss
    return total


def global_step(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("potluck_global_step"):
            return float(line.rsplit(" ", 1)[1])
    return None


def slope_per_hour(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes), in MB per hour."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return float("nan")
    cov = sum((t - mean_t) * (r - mean_r) for t, r in points)
    return cov / var * 3600 / MB


def write_spec(workdir: Path) -> Path:
    model, train, held_out = build_assets(workdir / "tiny")
    spec = {
        "run_id": "soak",
        "model": {"name_or_path": str(model)},
        "data": {"path": str(train), "eval_path": str(held_out), "max_length": 16},
        "optimizer": {"lr": 0.003},
        "batch": {"target_batch_size": 256, "per_peer_batch_size": 64},
        "max_global_steps": 10_000_000,
        "averaging": {"matchmaking_time": 1.0, "averaging_timeout": 15, "load_state_timeout": 30},
        "seed": 0,
    }
    path = workdir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Soak:
    def __init__(self, swarm: LocalSwarm, workdir: Path, args: argparse.Namespace):
        self.swarm, self.workdir, self.args = swarm, workdir, args
        self.began = time.monotonic()
        self.live: dict[str, Incarnation] = {}
        self.all: list[Incarnation] = []

    def now(self) -> float:
        return time.monotonic() - self.began

    def start(self, slot: str, min_peers: int) -> Incarnation:
        number = sum(i.slot == slot for i in self.all)
        port = free_port()
        args = [
            "--identity-path", str(self.workdir / f"{slot}.id"), "--metrics-port", str(port),
            "--min-peers", str(min_peers),
        ]  # fmt: skip
        peer = self.swarm.start_peer(f"{slot}-{number}", args, initial_peers=None if self.live else [])
        incarnation = Incarnation(slot, number, peer, port, self.now())
        self.live[slot] = incarnation
        self.all.append(incarnation)
        return incarnation

    def kill_and_restart(self, slot: str) -> None:
        incarnation = self.live.pop(slot)
        os.kill(incarnation.peer.process.pid, signal.SIGKILL)
        incarnation.peer.process.wait()
        incarnation.ended = self.now()
        self.start(slot, min_peers=1)

    def sample(self) -> None:
        for incarnation in self.live.values():
            if not incarnation.peer.running:
                raise RuntimeError(
                    f"peer {incarnation.name} exited by itself:\n{incarnation.peer.log()[-3000:]}"
                )
            t = self.now()
            step = global_step(incarnation.metrics_port)
            incarnation.samples.append((t, tree_rss(incarnation.peer.process.pid), step))
            if step is None or step <= 0:
                continue
            if incarnation.first_step_at is None:
                incarnation.first_step_at = incarnation.last_change_at = t
            elif step != incarnation.last_step:
                incarnation.longest_gap = max(incarnation.longest_gap, t - incarnation.last_change_at)
                incarnation.steps += int(step - (incarnation.last_step or step))
                incarnation.last_change_at = t
            incarnation.last_step = step

    def stuck(self, incarnation: Incarnation) -> str | None:
        end = incarnation.ended if incarnation.ended is not None else self.now()
        if incarnation.first_step_at is None:
            if end - incarnation.started > self.args.startup_grace + self.args.stuck_after:
                return f"{incarnation.name}: no global step in {end - incarnation.started:.0f} s of life"
            return None
        gap = max(incarnation.longest_gap, end - incarnation.last_change_at)
        if gap > self.args.stuck_after:
            return f"{incarnation.name}: {gap:.0f} s without a global step"
        return None

    def report_row(self, incarnation: Incarnation) -> tuple[str, float | None]:
        end = incarnation.ended if incarnation.ended is not None else self.now()
        warm = (incarnation.first_step_at or end) + self.args.warmup
        points = [(t, rss) for t, rss, _ in incarnation.samples if t >= warm and rss > 0]
        rss_all = [rss for _, rss, _ in incarnation.samples if rss > 0]
        growth = None
        if points and points[-1][0] - points[0][0] >= self.args.min_life:
            growth = slope_per_hour(points)
        first = f"{points[0][1] / MB:.0f}" if points else "-"
        last = f"{points[-1][1] / MB:.0f}" if points else "-"
        peak = f"{max(rss_all) / MB:.0f}" if rss_all else "-"
        gap = max(incarnation.longest_gap, end - (incarnation.last_change_at or end))
        row = (
            f"{incarnation.name:8} life {end - incarnation.started:6.0f} s  RSS MB warm {first:>5} "
            f"end {last:>5} max {peak:>5}  growth "
            f"{'-' if growth is None else f'{growth:+.0f} MB/h':>10}  global steps {incarnation.steps:4d}  "
            f"longest without one {gap:5.0f} s"
        )
        return row, growth

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["incarnation", "seconds", "rss_bytes", "global_step"])
            for incarnation in self.all:
                for t, rss, step in incarnation.samples:
                    writer.writerow([incarnation.name, f"{t:.1f}", rss, "" if step is None else step])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long to run")
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--kill-every", type=float, default=180.0, help="mean seconds between two kills")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between two samples")
    p.add_argument("--stuck-after", type=float, default=120.0, help="seconds without a global step = stuck")
    p.add_argument(
        "--startup-grace", type=float, default=180.0, help="seconds a (re)started peer may take to start"
    )
    p.add_argument(
        "--warmup", type=float, default=60.0, help="seconds after its first step before RSS counts"
    )
    p.add_argument(
        "--min-life", type=float, default=120.0, help="seconds of samples needed for a growth rate"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=Path, default=None, help="write every sample here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    slots = [chr(ord("a") + i) for i in range(args.peers)]
    with tempfile.TemporaryDirectory(prefix="potluck-soak-") as tmp:
        workdir = Path(tmp)
        with LocalSwarm(write_spec(workdir), workdir / "logs") as swarm:
            soak = Soak(swarm, workdir, args)
            first = soak.start(slots[0], min_peers=args.peers)
            swarm.wait_for_address(first.peer, timeout=300)
            for slot in slots[1:]:
                soak.start(slot, min_peers=args.peers)
            end = args.minutes * 60
            next_kill = args.kill_every * rng.uniform(0.5, 1.5)
            next_line = 60.0
            kills = 0
            while (t := soak.now()) < end:
                soak.sample()
                if t >= next_kill:
                    slot = rng.choice(slots)
                    print(f"[{t:6.0f} s] kill -9 {soak.live[slot].name}, restarting it", flush=True)
                    soak.kill_and_restart(slot)
                    kills += 1
                    next_kill = t + args.kill_every * rng.uniform(0.5, 1.5)
                if t >= next_line:
                    states = []
                    for i in soak.live.values():
                        rss = i.samples[-1][1] / MB if i.samples else 0
                        states.append(f"{i.name} step {i.last_step or 0:.0f} {rss:.0f} MB")
                    print(f"[{t:6.0f} s] " + "; ".join(states), flush=True)
                    next_line += 60
                time.sleep(args.sample_every)  # the sampling period
            for incarnation in soak.live.values():
                incarnation.ended = soak.now()
            if args.csv:
                soak.write_csv(args.csv)
    print(f"\n{args.peers} peers, {args.minutes:g} min, {kills} kill -9 + restart:")
    growth_by_slot: dict[str, list[float]] = {slot: [] for slot in slots}
    for incarnation in soak.all:
        row, growth = soak.report_row(incarnation)
        print(row)
        if growth is not None:
            growth_by_slot[incarnation.slot].append(growth)
    stuck = [s for s in (soak.stuck(i) for i in soak.all) if s]
    worst = ", ".join(
        f"{slot} {max(g):+.0f} MB/h" if g else f"{slot} -" for slot, g in growth_by_slot.items()
    )
    print(f"largest RSS growth per slot: {worst}; stuck: {'; '.join(stuck) if stuck else 'none'}")
    return 1 if stuck else 0


if __name__ == "__main__":
    sys.exit(main())
