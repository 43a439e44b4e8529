"""How many bytes do DiLoCo peers put on the wire beyond the averaged payload: per inner step, or per second?

What is measured
    ``--peers`` DiLoCo ``run-peer`` processes (tiny model, H = ``--inner-steps``, no compression, overlap
    off), each in its own host of ``tests/netbed`` (network namespaces, unshaped links; needs root), train
    ``--outer-steps`` outer steps. Each host's ``eth0`` counts what its peer sent (``tx_bytes``). Counted
    from the moment every peer has taken outer step 1 (start-up, the DHT's bootstrap and the joiners'
    state downloads are before it) to the end; the averaging payload of those rounds (the peers'
    ``averaging_round`` events) is subtracted: what is left is the control plane (DHT records and
    lookups, matchmaking, the libp2p connections' own traffic, the TCP acknowledgements of what the peer
    received). A catch-up's state download in that window would count too: each trial line says how many
    there were. Each host's sent bytes are also sampled every 0.1 s, which splits the control plane into a rate
    between rounds (time-driven: DHT records and reads, the connections' upkeep) and bytes per round beyond its
    payload (the round's own: check-ins or matchmaking, the all-reduce's framing and acknowledgements); a round
    lasts from its start to the end of its all-reduce (its ``averaging_round`` event's ``seconds`` and
    ``phases``).

    Modes (``--modes``, all by default), in rotated order within each repeat; each but ``now`` sets constants of
    ``peer/averaging/diloco.py`` to other values (what they were before a change, or an experiment) (``--with
    NAME=VALUE`` in this file run as the peers' entry, so ``run-peer`` has no benchmark-only branch):

    - ``per-step``: every inner step publishes the peer's progress record (``PROGRESS_REPORT_SECONDS = 0``);
    - ``poll-0.1``: a peer that has taken H reads the swarm's progress every 0.1 s while it waits for the others
      (``READY_POLL_SECONDS = 0.1``, an experiment) instead of every 0.5 s;
    - ``matchmaking``: every round searches for its group (``KEEP_GROUPS`` off) after the ready-wait, and the
      tracker reads the swarm's progress every 0.5 s by itself (``TRACKER_REFRESH_SECONDS = 0.5``): run-peer
      before kept groups (2026-12-06);
    - ``tracker-0.5``: kept groups, with the tracker's own reads every 0.5 s;
    - ``now``: today's ``run-peer``: a record at the start of an outer step, when H are taken, and at most every
      ``PROGRESS_REPORT_SECONDS`` in between; kept groups; the tracker's own reads every
      ``TRACKER_REFRESH_SECONDS``, and a ready peer's every ``READY_POLL_SECONDS`` while it waits for the others.

How to read it
    One line per trial (control-plane bytes per peer and outer step, seconds per outer step), then per mode
    the min/median/max over repeats, and ``ratio=…`` (median per-step ÷ median now, bytes).

Run: ``.venv/bin/python bench/control_plane.py`` (root; about 1 minute per trial on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from workdir import median_min_max, run_in_workdir, runs_parser, wait_for, write_tiny_spec

from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.assets import build_assets

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
PORT = 31337
MODES = {
    "per-step": ("PROGRESS_REPORT_SECONDS=0",),
    "poll-0.1": ("READY_POLL_SECONDS=0.1",),
    "matchmaking": ("KEEP_GROUPS=0", "TRACKER_REFRESH_SECONDS=0.5"),
    "tracker-0.5": ("TRACKER_REFRESH_SECONDS=0.5",),
    "now": (),
}
"""Each mode's constants of ``peer/averaging/diloco.py`` (``--with``); ``now`` changes none."""


def tx_bytes(host) -> int:
    return int(host.run("cat", "/sys/class/net/eth0/statistics/tx_bytes").stdout)


SAMPLER = """
import time
while True:
    with open("/sys/class/net/eth0/statistics/tx_bytes") as f:
        print(f"{time.time():.4f} {f.read().strip()}", flush=True)
    time.sleep(0.1)
"""
"""Prints its host's sent bytes every 0.1 s, with the time (run inside the host)."""


class TxSamples:
    """A host's sent bytes over time (:data:`SAMPLER` in the host), to tell the bytes sent during rounds from those
    sent between them."""

    def __init__(self, host):
        self.samples: list[tuple[float, int]] = []
        self._process = host.popen([sys.executable, "-c", SAMPLER], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._process.stdout:
            at, sent = line.split()
            self.samples.append((float(at), int(sent)))

    def at(self, moment: float) -> float:
        """Bytes sent by ``moment`` (interpolated between samples)."""
        times = [t for t, _ in self.samples]
        i = bisect.bisect_left(times, moment)
        if i == 0 or i == len(times):
            return float(self.samples[min(i, len(times) - 1)][1])
        (t0, b0), (t1, b1) = self.samples[i - 1], self.samples[i]
        return b0 + (b1 - b0) * (moment - t0) / max(t1 - t0, 1e-9)


def split_by_rounds(samples: TxSamples, rounds: list[dict], start: float, end: float) -> tuple[float, float]:
    """(bytes per second sent between rounds, bytes per round sent during rounds beyond their payload) of one peer
    from ``start`` to ``end``; a round lasts from its start (``seconds`` before its event, less its ``apply``
    phase, which came after the all-reduce) to the end of its all-reduce."""
    during, during_seconds = 0.0, 0.0
    for e in rounds:
        apply = (e.get("phases") or {}).get("apply", 0.0)
        ended = e["time"] - apply
        began = ended - e["seconds"]
        during += samples.at(ended) - samples.at(began) - e["bytes_sent"]
        during_seconds += ended - began
    between = samples.at(end) - samples.at(start) - during - sum(e["bytes_sent"] for e in rounds)
    return between / max(end - start - during_seconds, 1e-9), during / max(len(rounds), 1)


def one_trial(spec_path: Path, folder: Path, mode: str, args: argparse.Namespace) -> dict[str, float]:
    sys.path.insert(0, str(REPO_ROOT))  # tests/ is not installed; the test bed lives there
    from tests.netbed import NetBed

    constants = MODES[mode]
    entry = (str(SCRIPT), *(f"--with={c}" for c in constants), "--") if constants else None
    with NetBed() as bed, LocalSwarm(spec_path, folder / "logs") as swarm:
        hosts, peers = [], []
        for i in range(args.peers):
            host = bed.add_host(f"p{i}", seed=i)
            peer_args = ["--host-maddrs", f"/ip4/{host.address}/tcp/{PORT}", "--min-peers", str(args.peers)]
            peer = swarm.start_peer(
                f"p{i}", peer_args, command_prefix=host.command([]), **({"entry": entry} if entry else {})
            )
            swarm.wait_for_address(peer, timeout=180)
            hosts.append(host)
            peers.append(peer)
        samplers = [TxSamples(h) for h in hosts]
        wait_for(lambda: all(p.events("global_step") for p in peers), 300, "outer step 1 on every peer")
        start, started, window = [tx_bytes(h) for h in hosts], time.monotonic(), time.time()
        codes = swarm.wait_all(timeout=args.timeout)
        seconds = time.monotonic() - started
        end = [tx_bytes(h) for h in hosts]
        finished = time.time()
        if any(codes):
            failed = next(p for p, code in zip(peers, codes, strict=True) if code)
            raise RuntimeError(f"exit codes {codes}; {failed.name}:\n{failed.log()[-3000:]}")
    control, downloads, between, during = [], 0, [], []
    for peer, before, after, samples in zip(peers, start, end, samplers, strict=True):
        first = peer.events("global_step")[0]["time"]
        rounds = [e for e in peer.events("averaging_round") if e["time"] > first]
        control.append(after - before - sum(e["bytes_sent"] for e in rounds))
        downloads += sum(e["time"] > first for e in peer.events("state_download"))
        rate, per_round = split_by_rounds(
            samples, [e for e in rounds if e["outcome"] == "succeeded"], window, finished
        )
        between.append(rate)
        during.append(per_round)
    steps = args.outer_steps - 1
    return {
        "control_per_step": statistics.mean(control) / steps,
        "seconds_per_step": seconds / steps,
        "downloads": downloads,
        "between_per_second": statistics.mean(between),
        "during_per_round": statistics.mean(during),
    }


def run(workdir: Path, args: argparse.Namespace) -> int:
    build_assets(workdir)
    averaging = {
        "strategy": "diloco",
        "inner_steps": args.inner_steps,
        "overlap_communication": False,
        "matchmaking_time": args.matchmaking_time,
        "averaging_timeout": 15.0,
    }
    spec_path = write_tiny_spec(
        workdir / "run.yaml", workdir, "bench-control-plane", 64 * args.peers, 64, averaging,
        max_global_steps=args.outer_steps,
    )  # fmt: skip
    names = args.modes
    found: dict[str, list[dict[str, float]]] = {mode: [] for mode in names}
    for r in range(args.runs):
        for mode in names[r % len(names) :] + names[: r % len(names)]:
            trial = one_trial(spec_path, workdir / f"run{r}-{mode}", mode, args)
            found[mode].append(trial)
            print(
                f"repeat {r + 1} {mode}: control plane {trial['control_per_step'] / 1e3:.1f} kB per peer and"
                f" outer step, {trial['seconds_per_step']:.2f} s per outer step, {trial['downloads']} state"
                " downloads in the window (their bytes count as control plane here); of it"
                f" {trial['between_per_second'] / 1e3:.1f} kB/s between rounds and"
                f" {trial['during_per_round'] / 1e3:.1f} kB per round beyond its payload",
                flush=True,
            )
    for mode in names:
        kilobytes = [t["control_per_step"] / 1e3 for t in found[mode]]
        seconds = [t["seconds_per_step"] for t in found[mode]]
        print(
            f"{mode}: {median_min_max('kB_per_peer_step', kilobytes, 1)} {median_min_max('s_per_step', seconds, 2)}"
        )
    ratios = ""  # each mode's control-plane bytes ÷ today's (medians)
    if "now" in found:
        now = statistics.median(t["control_per_step"] for t in found["now"])
        ratios = " ".join(
            f"{mode}_ratio={statistics.median(t['control_per_step'] for t in found[mode]) / now:.2f}"
            for mode in names
            if mode != "now"
        )
    print(
        f"{ratios} peers={args.peers} inner_steps={args.inner_steps} outer_steps={args.outer_steps} repeats={args.runs}"
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = runs_parser(__doc__, runs=3)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=50, help="H")
    p.add_argument("--outer-steps", type=int, default=5)
    p.add_argument("--matchmaking-time", type=float, default=0.5)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="which modes to run")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one trial may take")
    return p.parse_args(argv)


def run_peer_with(argv: list[str]) -> int:
    """``run-peer`` (the flags after ``--``) with constants of ``peer/averaging/diloco.py`` set otherwise
    (``--with=NAME=VALUE`` before ``--``)."""
    from potluck.peer import cli
    from potluck.peer.averaging import diloco

    split = argv.index("--")
    for setting in argv[:split]:
        name, value = setting.removeprefix("--with=").split("=")
        assert hasattr(diloco, name), name
        setattr(diloco, name, float(value))
    return cli.main(argv[split + 1 :])


if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1].startswith("--with="):
        sys.exit(run_peer_with(sys.argv[1:]))
    sys.exit(run_in_workdir(run, parse_args(None), "control-plane"))
