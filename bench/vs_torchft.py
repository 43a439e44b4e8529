"""Potluck's DiLoCo side by side with torchft's: time, bytes and held-out loss, Potluck ÷ torchft (issue 21).

Setup
    Both sides train the bundled tiny model (full weights, no adapter) on the bundled task, CPU and one thread per
    replica, for ``--outer-steps`` outer steps of H = ``--inner-steps`` inner steps with batches of 64: inner AdamW
    (lr 3e-3, constant), outer SGD with Nesterov momentum (lr 0.7, momentum 0.9), the same run spec read by both.
    Replica i walks the same batches on both sides: ``run-peer`` gets an ``--identity-path`` made once, and the
    torchft replica gets the data seed (``peer_seed``) of that identity's peer id. Each replica runs in its own
    host of ``tests/netbed`` (network namespaces, unshaped links; needs root), so every byte it sends is counted
    on its host's ``eth0``; each host has its own hostname, resolvable by every host, as machines of a cluster do.

    - **Potluck**: ``run-peer`` as its users start it (the first peer, then the others with its address;
      ``--min-peers`` all of them), DiLoCo with ``overlap_communication`` off and ``matchmaking_time`` 0.5 s,
      no compression. It runs through this file's ``--timed-peer``, which only records each inner step's times
      (``Trainer``'s own step timing, ``PeerMetrics.local_step``) and whether the step ended an outer step.
    - **torchft 0.2.0**: ``torchft_lighthouse --min_replicas N`` on a host of its own, then N replicas, each
      ``torchrun --nproc_per_node 1 bench/torchft_replica.py`` (a ``Manager`` over gloo, synchronous quorum,
      ``min_replica_size`` N, ``init_sync`` off as torchft advises for weights that start identical, torchft's
      ``DiLoCo``).

    ``--fixed-group`` sets Potluck's ``averaging.target_group_size`` to the replica count (a round then stops
    matchmaking as soon as the group is full instead of waiting out ``matchmaking_time``).

    The order of the two sides alternates per repeat; ``--runs`` repeats for each ``--replicas`` count.

What is measured (each a ratio Potluck ÷ torchft of one repeat; min / median / max over repeats)
    - ``wall``: from launching the first process (the first ``run-peer``; the lighthouse) to the exit of the last
      replica, seconds. Every ``run-peer`` is launched at once, the others with the first one's address, known
      beforehand from its identity, host and port (as torchft's replicas are launched with the lighthouse's).
    - ``training``: from the start of the earliest first inner step of any replica to the end of the latest last
      outer step, seconds.
    - ``step``: one inner step: the median over replicas and steps of a whole training-loop iteration (batch,
      forward, backward, inner optimizer step, zero_grad) that does not end an outer step.
    - ``round``: the outer round's critical path: the iteration that ends an outer step (the H-th, whose
      optimizer step waits for the others, averages the pseudo-gradients and takes the outer step) less the
      replica's median ``step``; the median over rounds and replicas.
    - ``bytes``: every byte every host (the lighthouse's too) sent on ``eth0`` from launch to exit, per replica.
    - ``beyond``: bytes beyond the payload and the state downloads: what the hosts sent from the moment every
      replica has taken outer step 1 (start-up and the initial state transfers are before it) to the end, less
      the all-reduce payload of those rounds, per replica and outer step. Potluck's payload is what its
      ``averaging_round`` events report sent; torchft's is the ring all-reduce gloo runs, 2 (N - 1) / N times
      the fp32 pseudo-gradient per replica and round (tensors are all-reduced one by one).
    - ``loss``: held-out loss (``exact_match.held_out_loss``, the demo's evaluation) of replica 0's final
      weights.
    - Potluck's round phases (no ratio; torchft has no such record): medians over every peer's successful rounds
      of their ``averaging_round`` events' ``phases`` (``group``: from the peer's start of the round until its
      group was formed, mostly waiting for the slowest peer; ``all_reduce``; ``handoff``; ``apply``), and
      ``formed``: per round the least ``group`` of its peers (the last to arrive waits only for the group to form),
      median over rounds, where every peer's rounds all succeeded.

How to read it
    One line per trial, then per replica count a table of the ratios (min / median / max) and
    ``replicas=N round_ratio=… wall_ratio=… step_ratio=… loss_ratio=…`` (medians); the last line is that of the
    largest count. Issue 21's goals: round ≤ 1.5, wall ≤ 1.2, step ≤ 1.05, beyond ≤ 1.2 at 4 replicas.

Run: ``make bench-vs-torchft`` (installs the ``vs-torchft`` extra, then runs
``.venv/bin/python bench/vs_torchft.py --runs 3 --replicas 2,4``; root; about a minute per trial on 2 CPU cores).
NOTE: ``run-peer``'s joiners check that their identity is not taken (hivemind does, for an identity file that
exists), which a peer without ``--identity-path`` skips: it counts in Potluck's ``wall``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from workdir import checkpoints, run_in_workdir, runs_parser, wait_for, write_tiny_spec

from potluck.peer.training.data import peer_seed
from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.assets import build_assets

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
REPLICA = SCRIPT.parent / "torchft_replica.py"
MISSING = "torchft is missing: `make bench-vs-torchft` installs the bench's extra (vs-torchft) and runs it"
PEER_PORT, STORE_PORT, LIGHTHOUSE_PORT = 31337, 29600, 29510
SIDES = ("torchft", "potluck")
MEASURES = ("wall", "training", "step", "round", "bytes", "beyond", "loss")


def sent(hosts) -> int:
    return sum(int(h.run("cat", "/sys/class/net/eth0/statistics/tx_bytes").stdout) for h in hosts)


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


@contextlib.contextmanager
def resolvable(hosts):
    """Every host's name resolves to its address inside every host (``ip netns exec`` mounts
    ``/etc/netns/<namespace>/hosts`` over ``/etc/hosts``): torchft advertises its servers by hostname."""
    table = "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in hosts)
    folders = [Path("/etc/netns") / h.namespace for h in hosts]
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(table)
        yield
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def named(host, command: list[str]) -> list[str]:
    """``command`` run inside ``host`` under the host's own hostname (its own UTS namespace)."""
    return host.command(["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host.name, *command])


def timing_measures(timings: list[list[dict]]) -> dict[str, float]:
    """``step``, ``round`` and ``training`` from each replica's iterations (``start``, ``end``, ``outer``)."""
    steps, rounds = [], []
    for lines in timings:
        plain = statistics.median(t["end"] - t["start"] for t in lines if not t["outer"])
        steps.append(plain)
        rounds += [t["end"] - t["start"] - plain for t in lines if t["outer"]]
    first = min(lines[0]["start"] for lines in timings)
    last = max(max(t["end"] for t in lines if t["outer"]) for lines in timings)
    return {"step": statistics.median(steps), "round": statistics.median(rounds), "training": last - first}


def torchft_trial(spec, spec_path: Path, folder: Path, n: int, seeds: list[int], args) -> dict:
    from tests.netbed import NetBed

    lighthouse = Path(sys.executable).with_name("torchft_lighthouse")
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="eth0",
        TORCHFT_LIGHTHOUSE=f"http://lh:{LIGHTHOUSE_PORT}",
    )  # fmt: skip
    folder.mkdir(parents=True)
    with NetBed() as bed:
        hosts = [bed.add_host("lh", seed=n), *(bed.add_host(f"r{i}", seed=i) for i in range(n))]
        timings = [folder / f"r{i}.timings.jsonl" for i in range(n)]
        with resolvable(hosts):
            before, launched = sent(hosts), time.time()
            log = (folder / "lh.log").open("w")
            hosts[0].popen(named(hosts[0], [str(lighthouse), "--min_replicas", str(n), "--join_timeout_ms",
                                            "10000"]), stdout=log, stderr=log, env=env)  # fmt: skip
            replicas = []
            for i, host in enumerate(hosts[1:]):
                command = [
                    sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
                    f"--master_addr={host.address}", f"--master_port={STORE_PORT}", str(REPLICA),
                    "--run-spec", str(spec_path), "--replica-id", host.name, "--replicas", str(n),
                    "--data-seed", str(seeds[i]), "--timings", str(timings[i]),
                    "--weights-out", str(folder / f"r{i}.pt"),
                ]  # fmt: skip
                log = (folder / f"r{i}.log").open("w")
                replicas.append(host.popen(named(host, command), stdout=log, stderr=log, env=env))

            def committed_one() -> bool:
                return all(any(t["committed"] >= 1 for t in read_lines(p)) for p in timings)

            wait_for(lambda: committed_one() or any(r.poll() for r in replicas), args.timeout, "outer step 1")
            window, window_start = sent(hosts), time.time()
            codes = [r.wait(timeout=args.timeout) for r in replicas]
            exited = time.time()
            after = sent(hosts)
        if any(codes):
            raise RuntimeError(f"torchft exit codes {codes}; see {folder}")
    lines = [read_lines(p) for p in timings]
    rounds_in_window = statistics.mean(sum(t["outer"] and t["end"] > window_start for t in r) for r in lines)
    payload = 2 * (n - 1) / n * 4 * parameter_count(spec) * rounds_in_window * n
    return {
        "wall": exited - launched,
        **timing_measures(lines),
        "bytes": (after - before) / n,
        "beyond": (after - window - payload) / n / max(rounds_in_window, 1),
        "loss": held_out(spec, folder / "r0.pt"),
        "payload": payload / n / max(rounds_in_window, 1),
    }


def potluck_trial(spec, spec_path: Path, folder: Path, n: int, identities: list[Path], args) -> dict:
    from tests.netbed import NetBed

    with NetBed() as bed, LocalSwarm(spec_path, folder / "logs") as swarm:
        hosts = [bed.add_host(f"p{i}", seed=i) for i in range(n)]
        timings = [folder / f"p{i}.timings.jsonl" for i in range(n)]
        with resolvable(hosts):
            # the first peer's address is known before it starts (its identity, host and port), as an operator
            # who keeps a peer's --identity-path knows it: every replica starts at once, as torchft's do
            first = f"/ip4/{hosts[0].address}/tcp/{PEER_PORT}/p2p/{peer_id_of(identities[0])}"
            before, launched = sent(hosts), time.time()
            peers = []
            for i, host in enumerate(hosts):
                peer_args = [
                    "--host-maddrs", f"/ip4/{host.address}/tcp/{PEER_PORT}", "--min-peers", str(n),
                    "--identity-path", str(identities[i]), "--save-dir", str(folder / host.name),
                ]  # fmt: skip
                peer = swarm.start_peer(
                    host.name, peer_args, initial_peers=[] if i == 0 else [first], command_prefix=named(host, []),
                    entry=(str(SCRIPT), "--timed-peer", str(timings[i])),
                )  # fmt: skip
                peers.append(peer)
            wait_for(
                lambda: all(p.events("global_step") for p in peers) or any(not p.running for p in peers),
                args.timeout, "outer step 1",
            )  # fmt: skip
            window, window_start = sent(hosts), time.time()
            codes = swarm.wait_all(timeout=args.timeout)
            exited = time.time()
            after = sent(hosts)
        if any(codes):
            failed = next(p for p, code in zip(peers, codes, strict=True) if code)
            raise RuntimeError(f"exit codes {codes}; {failed.name}:\n{failed.log()[-3000:]}")
    for peer, identity in zip(peers, identities, strict=True):
        if peer.events("joined")[0]["peer_id"] != peer_id_of(identity):
            raise RuntimeError(f"{peer.name} did not take the identity {identity}: its batches differ")
    rounds = [e for p in peers for e in p.events("averaging_round") if e["time"] > window_start]
    in_window = statistics.mean(sum(e["time"] > window_start for e in p.events("global_step")) for p in peers)
    payload = sum(e["bytes_sent"] for e in rounds)
    final = max(checkpoints(folder / "p0").items())[1]
    return {
        "wall": exited - launched,
        "phases": round_phase_medians([p.events("averaging_round") for p in peers]),
        **timing_measures([read_lines(p) for p in timings]),
        "bytes": (after - before) / n,
        "beyond": (after - window - payload) / n / max(in_window, 1),
        "loss": held_out(spec, final),
        "payload": payload / n / max(in_window, 1),
        "downloads": sum(e["time"] > window_start for p in peers for e in p.events("state_download")),
    }


def round_phase_medians(events_by_peer: list[list[dict]]) -> dict[str, float]:
    """Potluck's rounds by phase (``averaging_round`` events' ``phases``), medians over the rounds of every peer, and
    ``formed``: per round, the least ``group`` phase of its peers (the last peer to arrive waited only for the
    group to form, not for the others), median over rounds; only where every peer's rounds all succeeded."""
    rounds = [
        [e["phases"] for e in events if e["outcome"] == "succeeded" and e.get("phases")]
        for events in events_by_peer
    ]
    every = [phases for peer in rounds for phases in peer]
    if not every:
        return {}
    medians = {name: statistics.median(p[name] for p in every) for name in every[0]}
    if len({len(peer) for peer in rounds}) == 1 and all(
        len(e) == len(r) for e, r in zip(events_by_peer, rounds, strict=True)
    ):
        medians["formed"] = statistics.median(
            min(p["group"] for p in same) for same in zip(*rounds, strict=True)
        )
    return medians


def parameter_count(spec) -> int:
    return sum(p.numel() for p in load_model(spec, None).parameters())


def load_model(spec, weights: Path | None):
    import torch

    from potluck.peer.training.model import build_model

    if weights is not None and weights.is_dir():  # a run-peer checkpoint
        return build_model(spec, torch.device("cpu"), weights_from=str(weights))
    model = build_model(spec, torch.device("cpu"))
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model


def held_out(spec, weights: Path) -> float:
    from potluck.peer.training.exact_match import held_out_loss
    from potluck.peer.training.model import load_tokenizer

    model = load_model(spec, weights)
    return held_out_loss(
        model, load_tokenizer(spec.model), spec.data.eval_path, max_length=spec.data.max_length
    )


def peer_id_of(identity: Path) -> str:
    from hivemind.p2p import PeerID

    return str(PeerID.from_identity(identity.read_bytes()))


def make_identities(folder: Path, n: int) -> list[Path]:
    from hivemind.p2p import P2P

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"p{i}.key" for i in range(n)]
    for path in paths:
        if not path.exists():
            P2P.generate_identity(str(path))
    return paths


def run(workdir: Path, args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO_ROOT))  # tests/ is not installed; the test bed lives there
    from potluck.protocols.runspec import load_run_spec

    _, train, held = build_assets(workdir)
    averaging = {
        "strategy": "diloco", "inner_steps": args.inner_steps, "overlap_communication": False,
        "matchmaking_time": 0.5, "averaging_timeout": 15.0, "outer_lr": 0.7, "outer_momentum": 0.9,
    }  # fmt: skip
    found: dict[int, list[dict[str, dict]]] = {}
    for n in args.replicas:
        if args.fixed_group:
            averaging["target_group_size"] = n
        spec_path = write_tiny_spec(
            workdir / f"run-{n}.yaml", workdir, f"bench-vs-torchft-{n}", 64 * n, 64, averaging,
            max_global_steps=args.outer_steps, optimizer={"lr": 3e-3},
            data={"path": str(train), "eval_path": str(held), "max_length": 16},
            checkpoint={"save_every": args.outer_steps, "keep": 1},
        )  # fmt: skip
        spec = load_run_spec(spec_path)
        identities = make_identities(workdir / "identities", n)
        seeds = [peer_seed(spec.seed, peer_id_of(path)) for path in identities]
        found[n] = []
        for r in range(args.runs):
            trial = {}
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                folder = workdir / f"n{n}-run{r + 1}-{side}"
                shutil.rmtree(folder, ignore_errors=True)
                if side == "torchft":
                    trial[side] = torchft_trial(spec, spec_path, folder, n, seeds, args)
                else:
                    trial[side] = potluck_trial(spec, spec_path, folder, n, identities, args)
                print(f"replicas {n} repeat {r + 1} {side:>7}: " + describe(trial[side]), flush=True)
            found[n].append(trial)
    for n, trials in found.items():
        print(f"\nreplicas {n}, Potluck ÷ torchft (min / median / max over {len(trials)} repeats):")
        for name in MEASURES:
            ratios = [t["potluck"][name] / t["torchft"][name] for t in trials]
            print(f"  {name:>8}: {min(ratios):6.3f} {statistics.median(ratios):6.3f} {max(ratios):6.3f}")
    for n, trials in found.items():
        medians = {
            name: statistics.median(t["potluck"][name] / t["torchft"][name] for t in trials)
            for name in ("round", "wall", "step", "loss", "beyond")
        }
        print(
            f"replicas={n} round_ratio={medians['round']:.3f} wall_ratio={medians['wall']:.3f} "
            f"step_ratio={medians['step']:.3f} loss_ratio={medians['loss']:.3f} "
            f"beyond_ratio={medians['beyond']:.3f} inner_steps={args.inner_steps} "
            f"outer_steps={args.outer_steps} repeats={args.runs} fixed_group={args.fixed_group}"
        )
    return 0


def describe(trial: dict) -> str:
    return (
        f"wall {trial['wall']:.1f} s, training {trial['training']:.1f} s, step {trial['step'] * 1e3:.1f} ms, "
        f"round {trial['round']:.3f} s, {trial['bytes'] / 1e6:.2f} MB sent, beyond payload "
        f"{trial['beyond'] / 1e3:.1f} kB per outer step (payload {trial['payload'] / 1e3:.1f} kB), "
        f"loss {trial['loss']:.4f}"
        + (f", {trial['downloads']} state downloads in the window" if "downloads" in trial else "")
        + (
            "; round phases (medians) "
            + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in trial["phases"].items())
            if trial.get("phases")
            else ""
        )
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = runs_parser(__doc__, runs=3)
    p.add_argument(
        "--replicas", type=lambda s: [int(n) for n in s.split(",")], default=[2, 4], help="e.g. 2,4"
    )
    p.add_argument("--inner-steps", type=int, default=50, help="H")
    p.add_argument("--outer-steps", type=int, default=10)
    p.add_argument(
        "--fixed-group", action="store_true",
        help="Potluck: averaging.target_group_size = the replica count, as a swarm of known size (the demo) sets it",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one trial may take")
    return p.parse_args(argv)


def timed_peer(timings: Path, run_peer_args: list[str]) -> int:
    """``run-peer``, writing each inner step's ``start``, ``end`` and ``outer`` (it ended an outer step) to
    ``timings``, from the trainer's own step timing; nothing else changes."""
    from potluck.peer import launch
    from potluck.peer.averaging.diloco import DiLoCoAveraging
    from potluck.peer.training.metrics import PeerMetrics

    stepped = [False]
    out = timings.open("w")
    strategy_step, local_step = DiLoCoAveraging.step, PeerMetrics.local_step

    def step(self, batch_size: int) -> bool:
        stepped[0] = strategy_step(self, batch_size)
        return stepped[0]

    def observe(self, loss: float, samples: int, seconds: float, samples_per_second: float) -> None:
        end = time.time()
        out.write(json.dumps({"start": end - seconds, "end": end, "outer": stepped[0], "loss": loss}) + "\n")
        out.flush()
        local_step(self, loss, samples, seconds, samples_per_second)

    DiLoCoAveraging.step, PeerMetrics.local_step = step, observe
    return launch.main(run_peer_args)  # run-peer's own entry: it leaves as run-peer leaves


def main() -> int:
    if sys.argv[1:2] == ["--timed-peer"]:
        return timed_peer(Path(sys.argv[2]), sys.argv[3:])
    args = parse_args(None)
    try:
        import torchft  # noqa: F401
    except ImportError:
        print(MISSING, file=sys.stderr)
        return 2
    return run_in_workdir(run, args, "vs-torchft")


if __name__ == "__main__":
    sys.exit(main())
