"""Churn: a 4-peer swarm on home-like links loses a random peer to ``kill -9`` every minute, each
restarted at once; after a quiet spell, is it one swarm again, and how much training did the kills cost?

What is measured
    Four ``run-peer`` processes, each in its own host of the network test bed (``tests/netbed``; needs
    root): ``a`` and ``b`` on 50 Mbit/s, 10 ms each way, ±2 ms jitter; ``c`` on 5 Mbit/s, 90 ms each
    way (200 ms RTT to the others); ``d`` behind NAT, in client mode. The spec of ``bench/partition.py``
    (tiny model, target 256 of batches of 64, a checkpoint at every global step, ``--matchmaking-time``
    2 s). Once every peer has taken 3 global steps the window starts: every ``--kill-every`` seconds for
    ``--minutes`` a random peer gets ``kill -9`` and is restarted at once with the same
    ``--identity-path``, address and ``--save-dir`` (its leftover processes, if any, are killed by pid
    and counted); then ``--quiet`` seconds without kills; then every peer gets SIGTERM. A baseline run,
    the same swarm without kills over a window of the same length, runs in the same invocation (rotated
    with the churn run when ``--runs`` > 1). From the peers' ``--results`` files and checkpoints:

    - ``steps_ratio``: global steps the churned swarm took in its window ÷ the baseline's (issue 16: ≥ 0.6);
    - ``last_equal``: whether the 4 checkpoints of the last global step all peers wrote before the stop are
      bit-equal, and ``equal_of_last``: how many of the last ``--last`` common steps are;
    - state downloads over all incarnations: ``succeeded`` (applied: each matched its donor's manifest of
      dtype, shape and digest per tensor, ``CheckedDownloads``), ``failed``, ``discarded`` (cut short or
      corrupt, thrown away unused); ``unequal_after_load``: restarts whose first checkpoint after loading
      the swarm's state matches no other peer's of that step (a bad state applied would show here);
    - ``rejoin_s``: restart → the restarted peer's first global step; ``utilisation``: the peers' own
      compute utilisation at the stop (their summaries).

How to read it
    A line per kill, one per run, then ``steps_ratio=… last_equal=… …`` with medians, min and max.

Run: ``sudo .venv/bin/python bench/churn.py --runs 1`` (as root; about 20 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from workdir import (
    bit_equal,
    checkpoints,
    common_steps,
    median_min_max,
    run_in_workdir,
    runs_parser,
    step_at,
    wait_for,
    write_bed_spec,
)

from potluck.tools.peer_processes import LocalSwarm, PeerProcess
from potluck.tools.tiny.assets import build_assets

REPO_ROOT = Path(__file__).resolve().parents[1]
PORT = 31337
WARM_STEPS = 3
"""Global steps every peer takes before the window starts (all joined, the first downloads done)."""


@dataclass
class Slot:
    """One of the 4 peers: its host, and every process that ran as it (one per restart)."""

    name: str
    host: object  # tests.netbed.Host (tests/ is not installed: imported in one_run)
    client_mode: bool
    incarnations: list[PeerProcess] = field(default_factory=list)
    address: str | None = None
    """Its join address; the same across restarts (same identity, host and port). None: client mode."""

    @property
    def peer(self) -> PeerProcess:
        return self.incarnations[-1]

    def events(self, kind: str | None = None) -> list[dict]:
        return [e for p in self.incarnations for e in p.events(kind)]

    def save_dir(self, folder: Path) -> Path:
        return folder / self.name


class ChurnSwarm:
    """The 4 slots on the bed, started, killed and restarted."""

    def __init__(self, bed, swarm: LocalSwarm, folder: Path, slots: list[Slot]):
        self.bed, self.swarm, self.folder, self.slots = bed, swarm, folder, slots
        self.leftovers = 0
        self.unexpected_exits: list[str] = []

    def start(self, slot: Slot, min_peers: int) -> PeerProcess:
        args = [
            "--host-maddrs", f"/ip4/{slot.host.address}/tcp/{PORT}",
            "--identity-path", str(self.folder / f"{slot.name}.id"),
            "--save-dir", str(slot.save_dir(self.folder)),
            "--min-peers", str(min_peers),
            *(["--client-mode"] if slot.client_mode else []),
        ]  # fmt: skip
        # every public peer but itself: a restart joins through whichever of them is up
        initial = [s.address for s in self.slots if s is not slot and s.address]
        name = f"{slot.name}{len(slot.incarnations)}"
        peer = self.swarm.start_peer(name, args, initial_peers=initial, command_prefix=slot.host.command([]))
        slot.incarnations.append(peer)
        return peer

    def kill_and_restart(self, slot: Slot) -> None:
        from tests.netbed.bed import kill_namespace_processes, run

        os.kill(slot.peer.process.pid, signal.SIGKILL)
        slot.peer.process.wait()

        def namespace_empty() -> bool:
            return not run("ip", "netns", "pids", slot.host.namespace, check=False).stdout.split()

        # its DHT, averagers, p2pd and watchdog follow it by their lifeline (hivemind_ext/lifeline.py)
        with contextlib.suppress(TimeoutError):
            wait_for(namespace_empty, 10, "empty host", every=0.1)
        left = run("ip", "netns", "pids", slot.host.namespace, check=False).stdout.split()
        if left:
            self.leftovers += len(left)
            print(f"  {len(left)} process(es) of {slot.peer.name} outlived it by 10 s: killed", flush=True)
            kill_namespace_processes(slot.host.namespace)
        self.start(slot, min_peers=1)

    def check_running(self) -> None:
        """Restart a peer that exited by itself (a product fault: counted and printed, not hidden)."""
        for slot in self.slots:
            if not slot.peer.running:
                what = f"{slot.peer.name} exited by itself ({slot.peer.process.returncode}); log {slot.peer.log_path}"
                print(f"  {what}", flush=True)
                self.unexpected_exits.append(what)
                self.start(slot, min_peers=1)


def swarm_step_at(slots: list[Slot], moment: float) -> int:
    return max(step_at(s.events(), moment) for s in slots)


def equal_steps(save_dirs: list[Path], last: int) -> tuple[int, bool, int, int]:
    """(the last global step all peers saved, whether it is bit-equal, how many of the last ``last``
    common steps are bit-equal, how many common steps that was)."""
    found, common = common_steps(save_dirs)
    if not common:
        return -1, False, 0, 0
    recent = common[-last:]
    equal = [bit_equal([f[s] for f in found]) for s in recent]
    return recent[-1], equal[-1], sum(equal), len(recent)


def unequal_after_load(slots: list[Slot], folder: Path) -> tuple[int, int]:
    """(restarts that loaded the swarm's state and then wrote a checkpoint, those of them whose first
    checkpoint after the load is bit-equal to no other peer's of the same step)."""
    checked = unequal = 0
    saved = {s.name: checkpoints(s.save_dir(folder)) for s in slots}
    for slot in slots:
        for peer in slot.incarnations:
            loaded = peer.events("state_loaded")
            if not loaded:
                continue
            written = [e["global_step"] for e in peer.events("checkpoint") if e["time"] > loaded[0]["time"]]
            if not written:
                continue
            step = written[0]
            others = [saved[s.name][step] for s in slots if s is not slot and step in saved[s.name]]
            if not others or step not in saved[slot.name]:
                continue
            checked += 1
            unequal += not any(bit_equal([saved[slot.name][step], other]) for other in others)
    return checked, unequal


def one_run(
    spec_path: Path, folder: Path, args: argparse.Namespace, kills: bool, seed: int
) -> dict[str, float]:
    sys.path.insert(0, str(REPO_ROOT))  # tests/ is not installed; the test bed lives there
    from tests.netbed import Link, NetBed

    home = Link(rate_mbit=50, delay_ms=10, jitter_ms=2)
    slow = Link(rate_mbit=5, delay_ms=90, jitter_ms=2)  # RTT to a home peer: 2 × (90 + 10) = 200 ms
    rng = random.Random(seed)
    window = args.minutes * 60 + args.quiet
    with NetBed(max_seconds=window + 1800) as bed, LocalSwarm(spec_path, folder / "logs") as local:
        slots = [
            Slot("a", bed.add_host("a", home, seed=1), False),
            Slot("b", bed.add_host("b", home, seed=2), False),
            Slot("c", bed.add_host("c", slow, seed=3), False),
            Slot("d", bed.add_host("d", home, nat=True, seed=4), True),
        ]
        churn = ChurnSwarm(bed, local, folder, slots)
        for slot in slots:
            peer = churn.start(slot, min_peers=len(slots))
            if not slot.client_mode:
                slot.address = local.wait_for_address(peer, timeout=300)

        def warm() -> bool:
            churn.check_running()
            return all(len(s.events("global_step")) >= WARM_STEPS for s in slots)

        wait_for(warm, 600, f"{WARM_STEPS} global steps of every peer", every=1)
        began = time.time()
        kill_times = [
            began + k * args.kill_every for k in range(1, int(args.minutes * 60 // args.kill_every) + 1)
        ]
        restarts: list[tuple[PeerProcess, float]] = []
        for moment in kill_times if kills else []:
            while time.time() < moment:
                churn.check_running()
                time.sleep(min(1.0, max(0.0, moment - time.time())))  # a kill on its second
            slot = rng.choice(slots)
            killed = slot.peer.name
            churn.kill_and_restart(slot)
            restarts.append((slot.peer, time.time()))
            print(
                f"  [{time.time() - began:5.0f} s] kill -9 {killed}, restarted as {slot.peer.name}",
                flush=True,
            )
        while time.time() < began + window:
            churn.check_running()
            time.sleep(min(1.0, max(0.0, began + window - time.time())))  # the quiet spell, watched
        ended = time.time()
        steps = swarm_step_at(slots, ended) - swarm_step_at(slots, began)
        reached = ", ".join(f"{s.name} {step_at(s.events(), ended)}" for s in slots)
        print(f"  global step of each peer at the end: {reached}", flush=True)
        save_dirs = [s.save_dir(folder) for s in slots]
        last_step, last_equal, equal_count, compared = equal_steps(save_dirs, args.last)
        local.stop()
        summaries = [s.peer.summary() for s in slots]
        utilisation = [u.compute_utilisation for u in summaries if u and u.compute_utilisation is not None]
        downloads = [e for s in slots for e in s.events("state_download")]
        rejoin = []
        for peer, restarted in restarts:
            first = [e["time"] for e in peer.events("global_step")]
            rejoin.append(first[0] - restarted if first else float("inf"))
        checked, unequal = unequal_after_load(slots, folder)
        return {
            "steps": steps,
            "reached": swarm_step_at(slots, ended),
            "last_common_step": last_step,
            "last_equal": float(last_equal),
            "equal_of_last": equal_count,
            "compared": compared,
            "kills": len(restarts),
            "downloads_succeeded": sum(e["outcome"] == "succeeded" for e in downloads),
            "downloads_failed": sum(e["outcome"] == "failed" for e in downloads),
            "downloads_discarded": sum(e["discarded"] for e in downloads),
            "loads_checked": checked,
            "unequal_after_load": unequal,
            "rejoin_s": statistics.median(rejoin) if rejoin else float("nan"),
            "rejoin_max_s": max(rejoin) if rejoin else float("nan"),
            "utilisation": statistics.mean(utilisation) if utilisation else float("nan"),
            "leftovers": churn.leftovers,
            "unexpected_exits": len(churn.unexpected_exits),
            "checkpoints_staged": sum(len(list(d.glob(".staging-*"))) for d in save_dirs),
        }


def run(workdir: Path, args: argparse.Namespace) -> int:
    build_assets(workdir)
    spec_path = write_bed_spec(workdir, "bench-churn", args.matchmaking_time)
    results = []
    for r in range(1, args.runs + 1):
        order = (True, False) if r % 2 else (False, True)  # churn first in odd runs, baseline first in even
        found = {}
        for kills in order:
            kind = "churn" if kills else "baseline"
            print(f"run {r} {kind}:", flush=True)
            found[kind] = one_run(spec_path, workdir / f"run{r}-{kind}", args, kills, seed=args.seed + r)
            print(f"run {r} {kind}: " + " ".join(f"{k}={v:g}" for k, v in found[kind].items()), flush=True)
        found["churn"]["steps_ratio"] = found["churn"]["steps"] / max(1, found["baseline"]["steps"])
        found["churn"]["baseline_utilisation"] = found["baseline"]["utilisation"]
        results.append(found["churn"])
    keys = (
        "steps_ratio",
        "last_equal",
        "equal_of_last",
        "downloads_discarded",
        "unequal_after_load",
        "rejoin_s",
    )
    print(
        " ".join(median_min_max(k, [r[k] for r in results], 2) for k in keys)
        + f" kill_every={args.kill_every:g} minutes={args.minutes:g} quiet={args.quiet:g}"
        f" matchmaking_time={args.matchmaking_time:g} runs={args.runs}"
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = runs_parser(__doc__, runs=1)
    p.add_argument("--minutes", type=float, default=5.0, help="how long peers are killed")
    p.add_argument("--kill-every", type=float, default=60.0, help="seconds between two kills")
    p.add_argument("--quiet", type=float, default=120.0, help="seconds without kills after the last")
    p.add_argument("--matchmaking-time", type=float, default=2.0)
    p.add_argument("--last", type=int, default=10, help="common global steps checked for bit-equality")
    p.add_argument("--seed", type=int, default=0, help="which peers are killed")
    return p.parse_args(argv)


def stop_on_sigterm() -> None:
    """SIGTERM ends the bench as Ctrl-C does, through the ``with`` blocks that stop every peer and
    remove the bed (killing whatever still runs in its namespaces, by pid)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench/churn.py builds network namespaces: run it as root (sudo .venv/bin/python ...)")
    stop_on_sigterm()
    sys.exit(run_in_workdir(run, parse_args(None), "churn"))
