"""One malicious peer of four, with the weighted mean and with a robust aggregator: the honest peers' held-out loss.

What is measured
    4 ``run-peer`` processes on loopback train the demo's task (tiny model, full fine-tuning, the demo's
    optimizer; target 256 of batches of 64, ``--steps`` global steps, groups of 4). In an attacked run one of
    them is ``bench/poison_peer.py ATTACK 1`` (every local step: ``sign_flip`` -10x, a ``random`` direction at
    1000x the norm, ``inflate`` 1000x the claimed samples). Each run is done once with
    ``averaging.aggregator.kind: mean`` and once with ``--robust`` (default ``trimmed_mean``); the order of the
    two rotates from attack to attack. The honest peer ``a``'s last checkpoint is evaluated on the held-out
    set. Also from the clean runs: the median seconds of an averaging round under each aggregator.

How to read it
    One line per run: attack, aggregator, held-out loss, median round seconds.
    ``--runs`` repeats the whole set (the order of the two rotating again); then min / median / max of each
    ratio. Last line ``worst_robust_ratio=… worst_mean_ratio=… round_ratio=…`` (medians; issue 17: within 1.05
    of the clean run with the robust aggregator; the round ratio, robust ÷ mean in the clean runs, at most 1.2).

Run: ``.venv/bin/python bench/attacks.py`` (about 1.5 minutes per run on 2 CPU cores; 16 runs by default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml
from poison_peer import ATTACKS
from workdir import checkpoints, median_min_max, run_in_workdir, runs_parser

from potluck.peer.training.exact_match import evaluate_spec
from potluck.protocols.runspec import load_run_spec
from potluck.tools.demo import DEMO_SPEC, DEMO_TASK
from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.assets import build_assets

POISON_PEER = Path(__file__).resolve().parent / "poison_peer.py"
PEERS = 4


def write_spec(workdir: Path, aggregator: str, steps: int) -> Path:
    spec = {
        **DEMO_SPEC,
        "run_id": f"bench-attacks-{aggregator.replace('_', '-')}",
        "model": {"name_or_path": str(workdir / "tiny-model")},
        "data": {**DEMO_SPEC["data"], "path": str(workdir / "data" / "train.jsonl"),
                 "eval_path": str(workdir / "data" / "eval.jsonl")},
        "batch": {"target_batch_size": 64 * PEERS, "per_peer_batch_size": 64},
        "max_global_steps": steps,
        "averaging": {**DEMO_SPEC["averaging"], "target_group_size": PEERS, "aggregator": {"kind": aggregator}},
        "checkpoint": {"save_every": steps, "keep": 1},
    }  # fmt: skip
    path = workdir / f"{aggregator}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def one_run(spec_path: Path, folder: Path, attack: str | None, timeout: float) -> dict[str, float]:
    with LocalSwarm(spec_path, folder / "logs") as swarm:
        for i in range(PEERS):
            name = "a" if i == 0 else f"p{i}"
            args = ["--save-dir", str(folder / name), "--min-peers", str(PEERS)]
            bad = attack is not None and i == PEERS - 1
            entry = (str(POISON_PEER), attack, "1") if bad else ("-m", "potluck.peer.launch")
            peer = swarm.start_peer(
                "attacker" if bad else name, args, initial_peers=[] if i == 0 else None, entry=entry
            )
            swarm.wait_for_address(peer)
        honest = swarm.peers[0]
        code = honest.process.wait(timeout=timeout)
        if code != 0:
            raise RuntimeError(f"peer a exited {code}:\n{honest.log()[-3000:]}")
        rounds = [e["seconds"] for e in honest.events("averaging_round") if e["outcome"] == "succeeded"]
    found = checkpoints(folder / "a")
    loss = evaluate_spec(load_run_spec(spec_path), checkpoint=found[max(found)]).loss
    return {"loss": loss, "round_s": statistics.median(rounds) if rounds else float("nan")}


def run(workdir: Path, args: argparse.Namespace) -> int:
    build_assets(workdir, task=DEMO_TASK)
    specs = {kind: write_spec(workdir, kind, args.steps) for kind in ("mean", args.robust)}
    attacks = ["clean", *args.attacks]
    results: dict[tuple[str, str], list[dict[str, float]]] = {(a, k): [] for a in attacks for k in specs}
    for r in range(args.runs):
        for i, attack in enumerate(attacks):
            order = ["mean", args.robust] if (i + r) % 2 == 0 else [args.robust, "mean"]
            for kind in order:
                folder = workdir / f"run{r + 1}" / f"{attack}-{kind}"
                found = one_run(specs[kind], folder, None if attack == "clean" else attack, args.timeout)
                results[attack, kind].append(found)
                print(
                    f"run {r + 1} {attack:>10} {kind:>14}: held-out loss {found['loss']:.4f}"
                    f"  round {found['round_s']:.2f} s",
                    flush=True,
                )
    clean = statistics.median(f["loss"] for f in results["clean", "mean"])
    ratios = {key: [f["loss"] / clean for f in found] for key, found in results.items()}
    print("\nheld-out loss / the clean run's with the mean (median over runs, min, max):")
    for key, values in ratios.items():
        print(f"{key[0]:>10} {key[1]:>14}: {median_min_max('ratio', values)}")
    robust = [statistics.median(ratios[a, args.robust]) for a in attacks]
    mean = [statistics.median(ratios[a, "mean"]) for a in args.attacks]
    rounds = {k: statistics.median(f["round_s"] for f in results["clean", k]) for k in specs}
    print(
        f"worst_robust_ratio={max(robust):.3f} worst_mean_ratio={max(mean, default=float('nan')):.3f} "
        f"round_ratio={rounds[args.robust] / rounds['mean']:.2f} robust={args.robust} steps={args.steps} "
        f"runs={args.runs} attacks={','.join(args.attacks)}"
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = runs_parser(__doc__, runs=2)
    p.add_argument("--steps", type=int, default=40, help="global steps per run")
    p.add_argument("--robust", choices=["trimmed_mean", "median", "centered_clip"], default="trimmed_mean")
    p.add_argument(
        "--attacks",
        type=lambda text: text.split(","),
        default=["sign_flip", "random", "inflate"],
        help=f"comma-separated, of {', '.join(a for a in ATTACKS if a != 'nan')}",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_in_workdir(run, parse_args(None), "attacks"))
