"""Launch to first training step: where a ``run-peer``'s startup time goes (issue 21: at most 5 s beyond loading
the model).

What is measured
    ``run-peer`` on the tiny model and task, from the moment its process starts to the end of each startup
    phase, as the peer itself reports them (the ``startup`` event of ``--results``, ``peer/results.py``):
    ``imports`` (Python and the libraries, before ``main``), ``inputs_checked`` (spec, data, model files),
    ``model_loaded``, ``dht_joined`` (the libp2p daemon and the DHT node up and bootstrapped),
    ``strategy_ready`` (the averagers' processes started), ``peers_found`` (``--min-peers``), ``state_loaded``
    (the download of the swarm's state, or the attempt to find one), ``first_step``. Three cases, in rotated
    order:

    - ``alone``: the first peer of a new swarm (nobody to download from);
    - ``joining``: a peer joining a running one-peer swarm (it downloads the state first);
    - ``alone_bnb``: ``alone`` with bitsandbytes imported first, as every peer did where it was installed before
      ``peer/unused_libraries.py`` left it out of runs that quantise nothing (the baseline of that change).

    ``beyond model`` is ``first_step`` minus the time ``model_loaded`` took (from ``inputs_checked``).

How to read it
    Per case, min / median / max of each phase's end; then what importing bitsandbytes costs (``alone_bnb`` minus
    ``alone`` in the same run); last line ``alone_beyond_model=MEDIAN
    joining_beyond_model=MEDIAN …`` (seconds).

Run: ``.venv/bin/python bench/startup.py --runs 5`` (about 30 s per run on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from workdir import run_in_workdir, runs_parser, wait_for, write_tiny_spec

from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.assets import build_assets

PHASES = (
    "imports", "inputs_checked", "model_loaded", "dht_joined", "strategy_ready", "peers_found", "state_loaded",
    "first_step",
)  # fmt: skip


def startup_of(peer, timeout: float) -> dict[str, float]:
    (event,) = wait_for(lambda: peer.events("startup"), timeout, f"{peer.name}'s first step")
    phases = event["phases"]
    phases["beyond_model"] = phases["first_step"] - (phases["model_loaded"] - phases["inputs_checked"])
    return phases


CASES = ("alone", "joining", "alone_bnb")
WITH_BITSANDBYTES = (
    "-c",
    "import sys, potluck.peer, bitsandbytes\n"  # potluck.peer first: its guard keeps bitsandbytes off the hub
    "from potluck.peer.launch import main\n"
    "sys.exit(main(sys.argv[1:]))",
)


def one_trial(case: str, spec_path: Path, folder: Path, timeout: float) -> dict[str, float]:
    with LocalSwarm(spec_path, folder) as swarm:
        if case == "joining":
            first = swarm.start_peer("first", initial_peers=[])
            startup_of(first, timeout)  # training before the newcomer starts
            peer = swarm.start_peer(case)
        elif case == "alone_bnb":
            peer = swarm.start_peer(case, initial_peers=[], entry=WITH_BITSANDBYTES)
        else:
            peer = swarm.start_peer(case, initial_peers=[])
        return startup_of(peer, timeout)


def run(workdir: Path, args: argparse.Namespace) -> int:
    build_assets(workdir)
    spec_path = write_tiny_spec(
        workdir / "run.yaml",
        workdir,
        "bench-startup",
        64,
        64,
        {"matchmaking_time": 0.5, "averaging_timeout": 5},
    )
    found: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    for r in range(args.runs):
        for case in CASES[r % len(CASES) :] + CASES[: r % len(CASES)]:
            phases = one_trial(case, spec_path, workdir / f"run{r + 1}-{case}", args.timeout)
            found[case].append(phases)
            steps = " ".join(
                f"{name}={phases[name]:.2f}" for name in (*PHASES, "beyond_model") if name in phases
            )
            print(f"run {r + 1} {case:>7}: {steps}", flush=True)
    print()
    for case, trials in found.items():
        print(f"{case} (seconds from process start; min / median / max over {len(trials)} runs):")
        for name in (*PHASES, "beyond_model"):
            values = [t[name] for t in trials if name in t]
            if values:
                print(f"  {name:>15}: {min(values):6.2f} {statistics.median(values):6.2f} {max(values):6.2f}")
    medians = {
        f"{case}_{name}": statistics.median(t[name] for t in trials)
        for case, trials in found.items()
        for name in ("beyond_model", "first_step")
    }
    print("what importing bitsandbytes costs (alone_bnb - alone, same run; min / median / max):")
    for name in ("imports", "first_step"):
        cost = [b[name] - a[name] for a, b in zip(found["alone"], found["alone_bnb"], strict=True)]
        print(f"  {name:>15}: {min(cost):6.2f} {statistics.median(cost):6.2f} {max(cost):6.2f}")
    print(" ".join(f"{k}={v:.2f}" for k, v in medians.items()) + f" runs={args.runs}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = runs_parser(__doc__, runs=5)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds a peer may take to its first step")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_in_workdir(run, parse_args(None), "startup"))
