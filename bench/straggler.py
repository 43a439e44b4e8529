"""Does a straggler hold the swarm back? (issue #7, acceptance 6)

What is measured
    Two swarms on loopback (``LocalSwarm``, separate DHTs), running side by side so that both see the
    same load of the machine, with the bundled tiny task (``--target`` target_batch_size, default
    1024; per_peer_batch_size 64; matchmaking_time 0.5 s):

    - ``baseline``: ``--fast`` peers (default 2) at full speed;
    - ``straggler``: as many fast peers plus one peer ``--slowdown`` times slower (default 5).

    The straggler is made slow by ``bench/slow_peer.py``, a wrapper around run-peer: before each local
    batch it idles (factor - 1) x the shortest of its last 10 local steps, as a machine that
    computes that many times slower would. Its published samples/s, which the others' trackers use to
    count its in-flight batch, are therefore the slow machine's.

    After every peer of both has passed global step ``--warmup``, both are observed for ``--seconds``:
    the global step rate of the fast peers (global steps / s, from their ``/metrics``) and every
    peer's samples in the window (``potluck_samples_total``).

How to read it
    ``straggler_share`` is the straggler's share of the swarm's samples in the window. The acceptance
    is ``ratio = rate(with straggler) / rate(baseline) >= 1 - straggler_share``: the fast peers' global
    steps slow down by at most the straggler's share of the throughput. A straggler that the others
    wait for would make the ratio about 1/slowdown; a straggler that adds its samples without making
    anyone wait gives a ratio >= 1. ``straggler_rounds`` counts the gradient-averaging rounds the
    straggler took part in successfully (its samples went into global steps), ``straggler_state_downloads``
    how often it fell behind and had to download the swarm's state instead.

    All peers share this machine's CPU, so the straggler's processes (DHT, averagers, the state
    downloads it makes the fast peers serve) also take CPU from the fast peers, which separate
    machines would not. ``compute_normalized_ratio`` compares global steps per sample computed by
    the fast peers instead: below 1 only if the fast peers wait for the straggler.

    ``straggler_samples_slowdown`` is how many times fewer samples the straggler computed than a fast
    peer in the window (more than ``--slowdown`` when it loses time downloading the state).
    Repeat it (``--repeat``) to see the noise; the figures of each repeat are printed.

Run: ``.venv/bin/python bench/straggler.py`` (about 4 minutes on 2 loaded CPU cores; ``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml
from slow_peer import slow_peer_entry

from potluck.tools.coordinator_process import free_port
from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.assets import build_assets


def write_spec(workdir: Path, assets: tuple[Path, Path, Path], target: int) -> Path:
    model, train, held_out = assets
    spec = {
        "run_id": "straggler-bench",
        "model": {"name_or_path": str(model)},
        "data": {"path": str(train), "eval_path": str(held_out), "max_length": 16},
        "optimizer": {"lr": 0.003},
        "batch": {"target_batch_size": target, "per_peer_batch_size": 64},
        "max_global_steps": 100000,
        "averaging": {"matchmaking_time": 0.5, "averaging_timeout": 15},
        "seed": 0,
    }
    path = workdir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def scrape(port: int) -> dict[str, float]:
    """The series of a peer's /metrics we need; {} while it is not serving yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        bare = name.split("{")[0]
        if bare in ("potluck_global_step", "potluck_samples_total"):
            values[bare] = float(value)
        elif bare == "potluck_averaging_rounds_total" and 'outcome="succeeded"' in name:
            values["rounds"] = float(value)
        elif bare == "potluck_state_downloads_total" and 'outcome="succeeded"' in name:
            values["downloads"] = float(value)
    return values


@dataclass
class Observation:
    fast_rate: float  # global steps / s of the fast peers (their mean)
    samples: list[float]  # per peer, in the window; the straggler last if there is one
    straggler_rounds: float = 0.0
    straggler_downloads: float = 0.0


def start_swarm(stack: contextlib.ExitStack, spec: Path, workdir: Path, names: list[str], slowdown: float):
    """Peers named ``slow`` get the slowdown; returns the swarm and each peer's metrics port."""
    ports = {name: free_port() for name in names}
    swarm = stack.enter_context(LocalSwarm(spec, workdir))
    for i, name in enumerate(names):
        entry = {"entry": slow_peer_entry(slowdown)} if name == "slow" else {}
        args = ["--min-peers", str(len(names)), "--metrics-port", str(ports[name])]
        peer = swarm.start_peer(name, args, initial_peers=[] if i == 0 else None, **entry)
        if i == 0:
            swarm.wait_for_address(peer, timeout=300)
    return swarm, ports


def observe_side_by_side(spec: Path, workdir: Path, args) -> tuple[Observation, Observation]:
    """The baseline swarm and the straggler's swarm run at the same time (two separate DHTs), so both
    see the same load of the machine; the window starts once every peer of both passed --warmup."""
    fast = [f"fast{i}" for i in range(args.fast)]
    layouts = {"base": fast, "slow": [*fast, "slow"]}
    with contextlib.ExitStack() as stack:
        swarms = {
            key: start_swarm(stack, spec, workdir / key, names, args.slowdown)
            for key, names in layouts.items()
        }
        deadline = time.monotonic() + args.timeout

        def snapshot() -> dict[str, dict[str, dict[str, float]]]:
            found = {
                key: {n: scrape(port) for n, port in ports.items()} for key, (_, ports) in swarms.items()
            }
            for swarm, _ in swarms.values():
                dead = [p.name for p in swarm.peers if not p.running]
                if dead:
                    raise RuntimeError(f"peer(s) {dead} exited:\n{swarm.peers[0].log()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result within {args.timeout}s: {found}")
            return found

        def warm(found) -> bool:
            return all(
                s.get("potluck_global_step", 0) >= args.warmup for f in found.values() for s in f.values()
            )

        start = snapshot()
        while not warm(start):
            time.sleep(1)  # poll period
            start = snapshot()
        started = time.monotonic()
        time.sleep(args.seconds)  # the observation window itself
        end, elapsed = snapshot(), time.monotonic() - started
    results = []
    for key, names in layouts.items():
        first, last = start[key], end[key]
        rates = [(last[n]["potluck_global_step"] - first[n]["potluck_global_step"]) / elapsed for n in fast]
        samples = [last[n]["potluck_samples_total"] - first[n]["potluck_samples_total"] for n in names]
        result = Observation(sum(rates) / len(rates), samples)
        if key == "slow":
            result.straggler_rounds = last["slow"].get("rounds", 0) - first["slow"].get("rounds", 0)
            result.straggler_downloads = last["slow"].get("downloads", 0) - first["slow"].get("downloads", 0)
        results.append(result)
    return results[0], results[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", type=int, default=2, help="peers at full speed")
    p.add_argument("--target", type=int, default=1024, help="target_batch_size (per-peer batches are 64)")
    p.add_argument("--slowdown", type=float, default=5.0, help="how many times slower the straggler is")
    p.add_argument("--warmup", type=int, default=3, help="global step every peer passes before measuring")
    p.add_argument("--seconds", type=float, default=120.0, help="observation window")
    p.add_argument("--repeat", type=int, default=1, help="baseline/straggler pairs to run")
    p.add_argument("--timeout", type=float, default=600.0, help="give up on a swarm after this long")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="potluck-straggler-") as tmp:
        workdir = Path(tmp)
        spec = write_spec(workdir, build_assets(workdir / "tiny"), args.target)
        ratios = []
        for i in range(args.repeat):
            base, slow = observe_side_by_side(spec, workdir / f"repeat{i}", args)
            share = slow.samples[-1] / max(1.0, sum(slow.samples))
            ratio = slow.fast_rate / base.fast_rate if base.fast_rate else float("nan")
            ratios.append((ratio, share))
            measured = (sum(slow.samples[:-1]) / args.fast) / max(1.0, slow.samples[-1])
            # global steps per sample the fast peers computed: on one machine the straggler's processes
            # also take CPU from the fast peers, which separate machines would not
            per_sample = slow.fast_rate / sum(slow.samples[:-1]) / (base.fast_rate / sum(base.samples))
            print(
                f"repeat {i}: baseline {base.fast_rate:.3f} global steps/s ({args.fast} peers), with a "
                f"{args.slowdown:g}x straggler {slow.fast_rate:.3f}/s; ratio={ratio:.3f} "
                f"straggler_samples_slowdown={measured:.1f} "
                f"straggler_share={share:.3f} (samples per peer in the window: "
                f"{', '.join(f'{s:.0f}' for s in slow.samples)}; baseline {', '.join(f'{s:.0f}' for s in base.samples)}) "
                f"compute_normalized_ratio={per_sample:.3f} straggler_rounds={slow.straggler_rounds:.0f} "
                f"straggler_state_downloads={slow.straggler_downloads:.0f}",
                flush=True,
            )
    passed = sum(ratio >= 1 - share for ratio, share in ratios)
    ok = passed == len(ratios)
    print(f"{'PASS' if ok else 'FAIL'}: ratio >= 1 - straggler_share in {passed} of {len(ratios)} repeats")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
